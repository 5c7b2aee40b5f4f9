//! Building the child's command (program lookup, environment, marker, cgroup,
//! process group, death signal) and forking it from one long-lived thread.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, PoisonError};
use std::{env, fs, thread};

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::unistd::{getpid, getppid};
use tokio::runtime::Handle;
use tracing::error;

use super::contain::{MARKER_VAR, Placement};
use super::{ProcessSpec, SpawnError};

/// PATH when neither the spec nor rigd's environment has one (what `execvp`
/// falls back to).
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// The command to fork for `spec`, and the program it will execute; the child
/// carries `placement`'s marker and joins its cgroup (whose open
/// `cgroup.procs` it takes).
pub(crate) fn prepare(
    spec: &ProcessSpec,
    placement: &mut Placement,
) -> Result<(Command, PathBuf), SpawnError> {
    let service = spec.name.clone();
    let argv0 = spec.argv.first().ok_or_else(|| SpawnError::EmptyCommand {
        service: service.clone(),
    })?;
    if let Some(cwd) = &spec.cwd {
        let is_dir = fs::metadata(cwd).and_then(|m| {
            if m.is_dir() {
                Ok(())
            } else {
                Err(io::Error::from(io::ErrorKind::NotADirectory))
            }
        });
        if let Err(source) = is_dir {
            return Err(SpawnError::Cwd {
                service,
                cwd: cwd.clone(),
                source,
            });
        }
    }
    let path = child_path(spec.env.get("PATH").map(OsStr::new));
    let program = resolve_program(&service, argv0, spec.cwd.as_deref(), &path)?;

    let mut cmd = Command::new(&program);
    for key in own_config_vars(env::vars_os().map(|(k, _)| k), &spec.env) {
        cmd.env_remove(key);
    }
    cmd.arg0(argv0)
        .args(&spec.argv[1..])
        .envs(&spec.env)
        .env("PATH", &path)
        // After the spec's variables (and any removal of inherited ones): the
        // marker must be the supervisor's, whatever the spec or rigd's
        // environment says.
        .env(MARKER_VAR, &placement.marker)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group, so that stop signals reach whatever it starts too.
        .process_group(0);
    if let Some(cwd) = &spec.cwd {
        cmd.current_dir(cwd);
    }
    if let Some(procs) = placement.procs.take() {
        join_cgroup(&mut cmd, procs);
    }
    die_with_parent(&mut cmd);
    Ok((cmd, program))
}

/// Prefixes of the variables that configure rig itself (`RIG_TOKEN`, `RIG_ADDR`,
/// `RIG_STATE_DIR`, `RIGCTL_ENV`, ...).
const OWN_CONFIG_PREFIXES: [&str; 2] = ["RIG_", "RIGCTL_"];

/// The variables of rigd's own environment that a child must not inherit: rig's own
/// configuration, the token above all, unless the spec sets the variable itself (then the
/// spec's value replaces it). The `RIG_*` variables rig injects (`RIG_ENV`, the edges'
/// addresses) are in `spec_env`, so they pass.
fn own_config_vars<'a>(
    inherited: impl Iterator<Item = OsString> + 'a,
    spec_env: &'a BTreeMap<String, String>,
) -> impl Iterator<Item = OsString> + 'a {
    inherited.filter(move |key| {
        let Some(k) = key.to_str() else { return false };
        OWN_CONFIG_PREFIXES.iter().any(|p| k.starts_with(p)) && !spec_env.contains_key(k)
    })
}

/// The child's PATH: the directory of rigd's own executable (so that binaries
/// built next to rigd, like `rig-demo`, are found without installing them),
/// then the spec's PATH if it sets one, else rigd's.
fn child_path(spec_path: Option<&OsStr>) -> OsString {
    let base = spec_path
        .map(OsStr::to_os_string)
        .or_else(|| env::var_os("PATH"))
        .unwrap_or_else(|| DEFAULT_PATH.into());
    let Some(exe_dir) = env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
    else {
        return base;
    };
    let dirs = std::iter::once(exe_dir).chain(env::split_paths(&base));
    // A directory containing ':' cannot be put in PATH: fall back to the base.
    env::join_paths(dirs).unwrap_or(base)
}

/// Finds the program the way `execvp` would, but before forking, so that a
/// missing program is reported with the PATH that was searched.
fn resolve_program(
    service: &str,
    argv0: &str,
    cwd: Option<&Path>,
    path: &OsStr,
) -> Result<PathBuf, SpawnError> {
    let start_error = |program: &Path, source| SpawnError::Start {
        service: service.to_owned(),
        program: program.display().to_string(),
        source,
    };
    if argv0.contains('/') {
        let program = match cwd {
            Some(cwd) if Path::new(argv0).is_relative() => cwd.join(argv0),
            _ => PathBuf::from(argv0),
        };
        return match check_executable(&program) {
            Ok(()) => Ok(program),
            Err(e) => Err(start_error(Path::new(argv0), e)),
        };
    }
    // Relative PATH entries are relative to the child's working directory.
    let base = cwd
        .map(Path::to_path_buf)
        .or_else(|| env::current_dir().ok());
    let mut not_executable = None;
    for dir in env::split_paths(path) {
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        let dir = match &base {
            Some(base) if dir.is_relative() => base.join(dir),
            _ => dir,
        };
        let candidate = dir.join(argv0);
        match check_executable(&candidate) {
            Ok(()) => return Ok(candidate),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                not_executable.get_or_insert(candidate);
            }
            Err(_) => {}
        }
    }
    match not_executable {
        Some(candidate) => Err(start_error(
            &candidate,
            io::Error::from(io::ErrorKind::PermissionDenied),
        )),
        None => Err(SpawnError::NotFound {
            service: service.to_owned(),
            program: argv0.to_owned(),
            path: path.to_string_lossy().into_owned(),
        }),
    }
}

fn check_executable(path: &Path) -> io::Result<()> {
    let meta = fs::metadata(path)?;
    if meta.is_dir() {
        return Err(io::ErrorKind::IsADirectory.into());
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(io::ErrorKind::PermissionDenied.into());
    }
    Ok(())
}

/// Moves the child into the cgroup whose `cgroup.procs` is `procs` before it
/// executes anything, so that all it starts is born inside.
#[allow(unsafe_code)]
fn join_cgroup(cmd: &mut Command, procs: OwnedFd) {
    // SAFETY: the closure runs in the forked child before exec: one write(2)
    // to a descriptor opened before the fork ("0" means the writer itself),
    // and an io::Error from a raw errno on failure: no allocation, no locks.
    // The descriptor is close-on-exec, and closed in rigd when `cmd` drops.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::write(&procs, b"0")?;
            Ok(())
        });
    }
}

/// Makes the kernel SIGKILL the child when rigd dies, however it dies.
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    let parent = getpid();
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe work is allowed. It makes two syscalls (prctl,
    // getppid) and builds an io::Error from a raw errno: no allocation, no
    // locks.
    unsafe {
        cmd.pre_exec(move || {
            set_death_signal()?;
            // If rigd died between fork and prctl, the death signal will never
            // come (the child was already re-parented): give up instead.
            if getppid() != parent {
                return Err(Errno::ESRCH.into());
            }
            Ok(())
        });
    }
}

fn set_death_signal() -> io::Result<()> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)
}

type Job = Box<dyn FnOnce() + Send>;

/// Sends jobs to the spawner thread, started on first use.
static SPAWNER: Mutex<Option<mpsc::Sender<Job>>> = Mutex::new(None);

/// Forks `cmd` from the spawner thread, registering the child with the tokio
/// runtime of `handle`.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits,
/// not the process. Tokio's blocking threads (and any caller's thread) may
/// exit while rigd goes on, which would kill the child, so every fork happens
/// on one thread that lives as long as rigd: the sender kept in [`SPAWNER`] is
/// never dropped, so its loop never ends.
pub(crate) fn spawn(cmd: Command, handle: Handle) -> io::Result<tokio::process::Child> {
    let (reply_tx, reply_rx) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _runtime = handle.enter();
        let result = tokio::process::Command::from(cmd).spawn();
        let _ = reply_tx.send(result);
    });
    submit(job)?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("the spawner thread dropped the request"))?
}

fn submit(job: Job) -> io::Result<()> {
    let mut spawner = SPAWNER.lock().unwrap_or_else(PoisonError::into_inner);
    let sender = match &mut *spawner {
        Some(sender) => sender,
        None => {
            let (tx, rx) = mpsc::channel::<Job>();
            thread::Builder::new()
                .name("rig-spawner".into())
                .spawn(move || spawner_loop(rx))?;
            spawner.insert(tx)
        }
    };
    sender
        .send(job)
        .map_err(|_| io::Error::other("the spawner thread is gone"))
}

fn spawner_loop(jobs: mpsc::Receiver<Job>) {
    while let Ok(job) = jobs.recv() {
        // A panic must not end this thread: that would SIGKILL every child.
        if catch_unwind(AssertUnwindSafe(job)).is_err() {
            error!("a spawn request panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rigs_own_variables_are_not_inherited_unless_the_spec_sets_them() {
        let inherited = [
            "RIG_TOKEN",
            "RIG_ADDR",
            "RIGCTL_ENV",
            "HOME",
            "RIG_ENV",
            "RIGX",
        ]
        .map(OsString::from);
        let spec_env = BTreeMap::from([("RIG_ENV".to_string(), "shop".to_string())]);
        let removed: Vec<OsString> = own_config_vars(inherited.into_iter(), &spec_env).collect();
        assert_eq!(
            removed,
            ["RIG_TOKEN", "RIG_ADDR", "RIGCTL_ENV"].map(OsString::from)
        );
    }

    #[test]
    fn exe_dir_comes_first_then_the_spec_path() {
        let path = child_path(Some(OsStr::new("/opt/a:/opt/b")));
        let dirs: Vec<PathBuf> = env::split_paths(&path).collect();
        let exe_dir = env::current_exe()
            .expect("exe")
            .parent()
            .expect("dir")
            .to_path_buf();
        assert_eq!(dirs, [exe_dir, "/opt/a".into(), "/opt/b".into()]);
    }

    #[test]
    fn lookup_skips_non_executables_and_directories() {
        let found = resolve_program("s", "sh", None, OsStr::new("/nonexistent:/bin"));
        assert_eq!(found.expect("sh found"), PathBuf::from("/bin/sh"));
        let err = resolve_program("s", "etc", None, OsStr::new("/")).expect_err("a directory");
        assert!(matches!(err, SpawnError::NotFound { .. }), "{err}");
    }

    #[test]
    fn missing_program_names_service_program_and_path() {
        let err =
            resolve_program("web", "rig-dem", None, OsStr::new("/x:/y")).expect_err("missing");
        assert_eq!(
            err.to_string(),
            "service web: cannot start \"rig-dem\": No such file or directory (searched PATH /x:/y)"
        );
    }
}
