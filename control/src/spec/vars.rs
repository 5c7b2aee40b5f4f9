//! `${VAR}` references in a service's `command` and `env` values.
//!
//! The syntax is deliberately small so that the checker here and the orchestrator's expansion
//! cannot disagree: `${NAME}` (NAME is `[A-Za-z_][A-Za-z0-9_]*`) is replaced by the variable's
//! value; `$${` is a literal `${`; any other `$` is literal (so `$HOME` is passed through for a
//! shell to expand). An unterminated `${` or a bad name is an error.

/// A piece of a string: literal text or a variable reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Piece<'a> {
    Lit(&'a str),
    Var(&'a str),
}

/// Splits a string into literal text and `${VAR}` references.
pub(crate) fn pieces(s: &str) -> Result<Vec<Piece<'_>>, String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix("${") {
            // `$${` → a literal `${`.
            out.push(Piece::Lit(&rest[..i]));
            out.push(Piece::Lit("${"));
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('{') {
            let end = tail.find('}').ok_or_else(|| {
                format!("unterminated ${{ in {s:?} (write $${{ for a literal ${{)")
            })?;
            let name = &tail[..end];
            if !is_var_name(name) {
                return Err(format!(
                    "invalid variable name {name:?} in {s:?}: expected letters, digits and _, not starting with a digit"
                ));
            }
            out.push(Piece::Lit(&rest[..i]));
            out.push(Piece::Var(name));
            rest = &tail[end + 1..];
        } else {
            out.push(Piece::Lit(&rest[..=i]));
            rest = after;
        }
    }
    out.push(Piece::Lit(rest));
    out.retain(|p| *p != Piece::Lit(""));
    Ok(out)
}

fn is_var_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The variables a string references, in order.
pub fn var_refs(s: &str) -> Result<Vec<String>, String> {
    Ok(pieces(s)?
        .into_iter()
        .filter_map(|p| match p {
            Piece::Var(v) => Some(v.to_owned()),
            Piece::Lit(_) => None,
        })
        .collect())
}

/// Expands `${VAR}` references with `lookup` (see the module docs for the syntax). The error
/// names the first variable `lookup` does not know.
pub fn expand_vars(s: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    for p in pieces(s)? {
        match p {
            Piece::Lit(l) => out.push_str(l),
            Piece::Var(v) => match lookup(v) {
                Some(val) => out.push_str(&val),
                None => return Err(format!("variable {v} is not set")),
            },
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_references_and_keeps_other_dollars() {
        let look = |v: &str| match v {
            "STORE_ADDR" => Some("127.0.0.1:7000".to_owned()),
            "PORT" => Some("8080".to_owned()),
            _ => None,
        };
        assert_eq!(
            expand_vars("--store=${STORE_ADDR}", look).as_deref(),
            Ok("--store=127.0.0.1:7000")
        );
        assert_eq!(
            expand_vars("${PORT}${PORT}", look).as_deref(),
            Ok("80808080")
        );
        assert_eq!(
            expand_vars("echo $HOME $ $${PORT} cost$", look).as_deref(),
            Ok("echo $HOME $ ${PORT} cost$")
        );
        assert_eq!(
            expand_vars("${NOPE}", look),
            Err("variable NOPE is not set".to_owned())
        );
        assert!(
            expand_vars("${PORT", look)
                .unwrap_err()
                .contains("unterminated")
        );
        assert!(
            expand_vars("${9X}", look)
                .unwrap_err()
                .contains("invalid variable name")
        );
        assert!(
            expand_vars("${}", look)
                .unwrap_err()
                .contains("invalid variable name")
        );
    }

    #[test]
    fn lists_references() {
        assert_eq!(
            var_refs("a ${X} $${Y} ${Z_1}"),
            Ok(vec!["X".to_owned(), "Z_1".to_owned()])
        );
    }
}
