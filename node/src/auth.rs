//! Scoped bearer tokens. The server keeps only each token's sha256 (from a tokens file,
//! one `SCOPE HEX_SHA256` per line) and compares in constant time. `admin` may do
//! everything; `infer` may call the inference routes. Health, readiness and `/metrics`
//! need no token.

use sha2::{Digest, Sha256};
use std::path::Path;

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Infer,
    Admin,
}

impl Scope {
    fn parse(text: &str) -> Option<Scope> {
        match text {
            "admin" => Some(Scope::Admin),
            "infer" => Some(Scope::Infer),
            _ => None,
        }
    }

    fn allows(self, needed: Scope) -> bool {
        self == Scope::Admin || self == needed
    }
}

/// Why a request is not allowed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("this route needs a bearer token (Authorization: Bearer …)")]
    Missing,
    #[error("the bearer token is not valid")]
    Invalid,
    #[error("the token's scope does not allow this route; it needs {0:?}")]
    WrongScope(Scope),
}

/// The tokens a server accepts. Empty means authentication is off.
#[derive(Clone, Debug, Default)]
pub struct Tokens {
    hashed: Vec<(Scope, [u8; 32])>,
}

/// The hex sha256 of a token, as the tokens file stores it (`shoal token hash`).
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl Tokens {
    /// Parses a tokens file: `SCOPE HEX_SHA256` per line, `#` comments, blank lines.
    pub fn parse(text: &str) -> Result<Tokens, String> {
        let mut hashed = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let (Some(scope), Some(hash), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(format!("line {}: expected `SCOPE SHA256`", number + 1));
            };
            let scope = Scope::parse(scope).ok_or_else(|| {
                format!("line {}: scope {scope:?} is not admin or infer", number + 1)
            })?;
            let bytes = hex::decode(hash)
                .ok()
                .and_then(|bytes| <[u8; 32]>::try_from(bytes).ok())
                .ok_or_else(|| {
                    format!(
                        "line {}: not a hex sha256 (use `shoal token hash`)",
                        number + 1
                    )
                })?;
            hashed.push((scope, bytes));
        }
        Ok(Tokens { hashed })
    }

    pub fn load(path: &Path) -> Result<Tokens, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| format!("{}: {error}", path.display()))?;
        let tokens =
            Tokens::parse(&text).map_err(|error| format!("{}: {error}", path.display()))?;
        if tokens.is_empty() {
            return Err(format!("{} holds no tokens", path.display()));
        }
        Ok(tokens)
    }

    pub fn is_empty(&self) -> bool {
        self.hashed.is_empty()
    }

    /// Checks an `Authorization` header value against `needed`.
    pub fn check(&self, authorization: Option<&str>, needed: Scope) -> Result<(), AuthError> {
        if self.is_empty() {
            return Ok(());
        }
        let token = authorization
            .and_then(bearer_token)
            .map(str::trim)
            .filter(|token| !token.is_empty())
            .ok_or(AuthError::Missing)?;
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Look at every entry whatever matches, so timing says nothing about which one.
        let mut best: Option<Scope> = None;
        for (scope, stored) in &self.hashed {
            if constant_time_eq(&presented, stored) {
                best = best.max(Some(*scope));
            }
        }
        match best {
            None => Err(AuthError::Invalid),
            Some(scope) if scope.allows(needed) => Ok(()),
            Some(_) => Err(AuthError::WrongScope(needed)),
        }
    }
}

/// The token of an `Authorization: Bearer …` value. The scheme's name is
/// case-insensitive (RFC 9110, section 11.1): `bearer` and `BEARER` are `Bearer` too.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut difference = 0u8;
    for (x, y) in a.iter().zip(b) {
        difference |= x ^ y;
    }
    difference == 0
}

/// The scope a route needs, or `None` for open routes.
pub fn scope_for(path: &str) -> Option<Scope> {
    if path.starts_with("/api/") {
        return Some(Scope::Admin);
    }
    let runs_a_model = path.ends_with("/infer") || path.ends_with("/explain");
    if path.starts_with("/v1/") || (path.starts_with("/v2/models/") && runs_a_model) {
        return Some(Scope::Infer);
    }
    // Health, readiness, model metadata and /metrics stay open: probes and scrapers
    // carry no credentials.
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens::parse(&format!(
            "# operators\nadmin {}\n\ninfer {}\n",
            hash_token("root-secret"),
            hash_token("app-secret")
        ))
        .unwrap()
    }

    #[test]
    fn each_scope_opens_its_routes_and_admin_opens_all() {
        let tokens = tokens();
        assert_eq!(
            tokens.check(Some("Bearer root-secret"), Scope::Admin),
            Ok(())
        );
        assert_eq!(
            tokens.check(Some("Bearer root-secret"), Scope::Infer),
            Ok(())
        );
        assert_eq!(
            tokens.check(Some("Bearer app-secret"), Scope::Infer),
            Ok(())
        );
        assert_eq!(
            tokens.check(Some("Bearer app-secret"), Scope::Admin),
            Err(AuthError::WrongScope(Scope::Admin))
        );
    }

    #[test]
    fn a_missing_or_unknown_token_is_refused() {
        let tokens = tokens();
        assert_eq!(tokens.check(None, Scope::Infer), Err(AuthError::Missing));
        assert_eq!(
            tokens.check(Some("Basic abc"), Scope::Infer),
            Err(AuthError::Missing)
        );
        assert_eq!(
            tokens.check(Some("Bearer guess"), Scope::Infer),
            Err(AuthError::Invalid)
        );
    }

    /// Regression: `authorization: bearer <token>` was refused as missing.
    #[test]
    fn the_schemes_name_is_case_insensitive() {
        let tokens = tokens();
        for value in [
            "bearer app-secret",
            "BEARER app-secret",
            "bEaReR app-secret",
        ] {
            assert_eq!(tokens.check(Some(value), Scope::Infer), Ok(()), "{value}");
        }
        assert_eq!(
            tokens.check(Some("Bearerapp-secret"), Scope::Infer),
            Err(AuthError::Missing)
        );
    }

    #[test]
    fn no_tokens_means_no_authentication() {
        assert_eq!(Tokens::default().check(None, Scope::Admin), Ok(()));
    }

    #[test]
    fn a_malformed_tokens_file_names_its_line() {
        assert!(
            Tokens::parse("admin nothex")
                .unwrap_err()
                .starts_with("line 1")
        );
        assert!(
            Tokens::parse("\nroot abc")
                .unwrap_err()
                .starts_with("line 2")
        );
        assert!(Tokens::parse("admin").is_err());
    }

    #[test]
    fn routes_need_the_scope_of_what_they_do() {
        assert_eq!(scope_for("/api/v1/models"), Some(Scope::Admin));
        assert_eq!(scope_for("/v2/models/iris/infer"), Some(Scope::Infer));
        assert_eq!(
            scope_for("/v2/models/iris/versions/1/infer"),
            Some(Scope::Infer)
        );
        assert_eq!(scope_for("/v1/chat/completions"), Some(Scope::Infer));
        assert_eq!(scope_for("/v2/models/iris/explain"), Some(Scope::Infer));
        assert_eq!(
            scope_for("/v2/models/iris/versions/1/explain"),
            Some(Scope::Infer)
        );
        assert_eq!(scope_for("/v2/health/ready"), None);
        assert_eq!(scope_for("/metrics"), None);
    }
}
