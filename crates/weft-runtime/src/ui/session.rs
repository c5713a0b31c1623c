//! Dashboard sessions: a login with the admin token gets a random session
//! id (32 bytes from rand's CSPRNG, seeded by the OS; hex) kept in memory with its own
//! random CSRF token. The cookie carries only the id (`HttpOnly`,
//! `SameSite=Strict`, `Path=/ui`), never the token. Sessions end after
//! [`TTL`], on logout, and with the process; at most [`MAX_SESSIONS`] are
//! kept (the oldest goes first).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rand::RngCore;

/// The cookie's name.
pub const COOKIE: &str = "weft_session";
/// A session's life.
pub const TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at once.
pub const MAX_SESSIONS: usize = 256;

/// One logged-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    /// Sent back in every POST (form field `csrf` or header `x-csrf-token`).
    pub csrf: String,
    created: Instant,
}

#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

fn random_hex() -> String {
    let mut b = [0u8; 32];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

impl Sessions {
    /// A new session: its id (for the cookie).
    pub fn create(&self) -> String {
        let id = random_hex();
        let s = Session {
            csrf: random_hex(),
            created: Instant::now(),
        };
        if let Ok(mut map) = self.map.lock() {
            map.retain(|_, s| s.created.elapsed() < TTL);
            while map.len() >= MAX_SESSIONS {
                let Some(oldest) = map
                    .iter()
                    .min_by_key(|(_, s)| s.created)
                    .map(|(k, _)| k.clone())
                else {
                    break;
                };
                map.remove(&oldest);
            }
            map.insert(id.clone(), s);
        }
        id
    }

    /// The live session of a cookie header, if any.
    pub fn get(&self, cookie_header: Option<&str>) -> Option<(String, Session)> {
        let id = cookie_value(cookie_header?, COOKIE)?;
        let map = self.map.lock().ok()?;
        let s = map.get(id)?;
        (s.created.elapsed() < TTL).then(|| (id.to_owned(), s.clone()))
    }

    pub fn remove(&self, id: &str) {
        if let Ok(mut map) = self.map.lock() {
            map.remove(id);
        }
    }
}

/// `name`'s value in a `Cookie` header.
fn cookie_value<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

/// Equal, in time independent of where they differ.
pub fn same(a: &str, b: &str) -> bool {
    !a.is_empty() && bool::from(subtle::ConstantTimeEq::ct_eq(a.as_bytes(), b.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_found_by_its_cookie_only() {
        let s = Sessions::default();
        let id = s.create();
        assert_eq!(id.len(), 64);
        let header = format!("other=1; {COOKIE}={id}; x=y");
        let (got, sess) = s.get(Some(&header)).expect("found");
        assert_eq!(got, id);
        assert_eq!(sess.csrf.len(), 64);
        assert_ne!(sess.csrf, id);
        assert!(s.get(Some(&format!("{COOKIE}=00{}", &id[2..]))).is_none());
        assert!(s.get(Some("other=1")).is_none());
        assert!(s.get(None).is_none());
        s.remove(&id);
        assert!(s.get(Some(&header)).is_none());
    }

    #[test]
    fn sessions_are_bounded() {
        let s = Sessions::default();
        let first = s.create();
        for _ in 0..MAX_SESSIONS {
            s.create();
        }
        assert!(s.get(Some(&format!("{COOKIE}={first}"))).is_none());
        assert_eq!(s.map.lock().unwrap().len(), MAX_SESSIONS);
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "ab"));
        assert!(!same("", ""));
    }
}
