//! rigd's bearer token, as one type that cannot be printed by accident.
//!
//! A token reaches rig three ways: `--token` (visible to every local user in
//! `/proc/PID/cmdline`, so documented as the least safe), `RIG_TOKEN`, and
//! `--token-file` / `RIG_TOKEN_FILE`, a file only its owner may read. Wherever
//! it is held (rigd's configuration and shared state, rigctl's arguments), it is
//! a [`Secret`]: `Debug` and `Display` print `<redacted>`, and the value is
//! reached only through [`Secret::expose`], at the one place a header is
//! built or compared.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The most a token file may hold; a token is a line, not a document.
pub const MAX_TOKEN_FILE_BYTES: u64 = 4 * 1024;

/// A bearer token. Never empty: an empty `RIG_TOKEN` means no token
/// ([`Secret::non_empty`]).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// `Some` unless `s` is empty.
    pub fn non_empty(s: impl Into<String>) -> Option<Secret> {
        let s = s.into();
        (!s.is_empty()).then_some(Secret(s))
    }

    /// The value itself: only for building or checking an `authorization` header.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Reads a token from `path`: the first line, without its line ending. The
    /// file must belong to the current user and be readable by nobody else
    /// (mode 0600 or 0400), as ssh demands of a private key.
    pub fn from_file(path: &Path) -> Result<Secret, SecretFileError> {
        let err = |kind| SecretFileError {
            path: path.to_path_buf(),
            kind,
        };
        let meta = fs::metadata(path).map_err(|e| err(SecretFileErrorKind::Io(e)))?;
        if !meta.is_file() {
            return Err(err(SecretFileErrorKind::NotAFile));
        }
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(err(SecretFileErrorKind::Permissions(mode)));
        }
        if meta.uid() != nix::unistd::geteuid().as_raw() {
            return Err(err(SecretFileErrorKind::Owner(meta.uid())));
        }
        if meta.len() > MAX_TOKEN_FILE_BYTES {
            return Err(err(SecretFileErrorKind::TooLarge(meta.len())));
        }
        let text = fs::read_to_string(path).map_err(|e| err(SecretFileErrorKind::Io(e)))?;
        let line = text.lines().next().unwrap_or("").trim();
        Secret::non_empty(line).ok_or_else(|| err(SecretFileErrorKind::Empty))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// For clap: `--token VALUE` (an empty value is kept, and means no token).
impl FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// Why a token file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("token file {}: {kind}", path.display())]
pub struct SecretFileError {
    pub path: PathBuf,
    pub kind: SecretFileErrorKind,
}

#[derive(Debug, thiserror::Error)]
pub enum SecretFileErrorKind {
    #[error("{0}")]
    Io(io::Error),
    #[error("not a regular file")]
    NotAFile,
    #[error(
        "mode {0:04o} lets other users read it; make it private with `chmod 600` (as ssh requires of a key)"
    )]
    Permissions(u32),
    #[error("it belongs to uid {0}, not to the user running rig")]
    Owner(u32),
    #[error("{0} bytes is too large for a token (at most {MAX_TOKEN_FILE_BYTES})")]
    TooLarge(u64),
    #[error("it is empty")]
    Empty,
}

/// For clap's `value_parser` of `--token-file`: the token read from the file, so a bad
/// file is reported as a bad value of that flag, before anything else happens.
pub fn parse_token_file(path: &str) -> Result<Secret, SecretFileError> {
    Secret::from_file(Path::new(path))
}

/// The token from a `--token`/`RIG_TOKEN` value and a `--token-file`/`RIG_TOKEN_FILE`
/// (already read), at most one of which clap lets through; an empty value means none.
pub fn resolve<'a>(value: Option<&'a Secret>, file: Option<&'a Secret>) -> Option<&'a Secret> {
    file.or(value).filter(|s| !s.0.is_empty())
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn token_file(mode: u32, contents: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(contents.as_bytes()).expect("write");
        fs::set_permissions(f.path(), fs::Permissions::from_mode(mode)).expect("chmod");
        f
    }

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = Secret::non_empty("hunter2").expect("non-empty");
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        assert_eq!(s.to_string(), "<redacted>");
        assert_eq!(
            format!("{:?}", Some(&s)),
            "Some(Secret(<redacted>))",
            "inside a derived Debug too"
        );
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn an_empty_value_means_no_token() {
        assert_eq!(Secret::non_empty(""), None);
        assert_eq!(resolve(Some(&"".parse().unwrap()), None), None);
        let t = Secret::non_empty("t");
        assert_eq!(resolve(t.as_ref(), None), t.as_ref());
        let f = Secret::non_empty("f");
        assert_eq!(resolve(t.as_ref(), f.as_ref()), f.as_ref(), "the file wins");
    }

    #[test]
    fn a_private_file_gives_its_first_line() {
        let f = token_file(0o600, "s3cret\nignored\n");
        assert_eq!(Secret::from_file(f.path()).unwrap().expose(), "s3cret");
        let f = token_file(0o400, "  padded\r\n");
        let parsed = parse_token_file(f.path().to_str().unwrap()).unwrap();
        assert_eq!(parsed.expose(), "padded");
    }

    #[test]
    fn a_file_others_can_read_is_refused_with_the_fix() {
        let f = token_file(0o644, "s3cret\n");
        let e = Secret::from_file(f.path()).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(&f.path().display().to_string()), "{msg}");
        assert!(
            msg.contains("mode 0644") && msg.contains("chmod 600"),
            "{msg}"
        );
        assert!(!msg.contains("s3cret"), "{msg}");
    }

    #[test]
    fn empty_missing_and_huge_files_are_refused() {
        let f = token_file(0o600, "\n");
        assert!(matches!(
            Secret::from_file(f.path()).unwrap_err().kind,
            SecretFileErrorKind::Empty
        ));
        let missing = Path::new("/nonexistent/rig-token");
        let e = Secret::from_file(missing).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("token file /nonexistent/rig-token: "),
            "{e}"
        );
        let f = token_file(0o600, &"x".repeat(5000));
        assert!(matches!(
            Secret::from_file(f.path()).unwrap_err().kind,
            SecretFileErrorKind::TooLarge(5000)
        ));
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Secret::from_file(dir.path()).unwrap_err().kind,
            SecretFileErrorKind::NotAFile
        ));
    }
}
