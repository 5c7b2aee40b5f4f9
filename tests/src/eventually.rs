//! Polling assertions: wait for a condition with a deadline instead of sleeping.

use std::future::Future;
use std::time::{Duration, Instant};

/// Poll `f` every few milliseconds until it returns `Some`, or panic with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut wait = Duration::from_millis(2);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_millis(100));
    }
}

/// `assert_eventually!(cond_expr, "what")`: poll a boolean async expression for up to 10 s.
#[macro_export]
macro_rules! assert_eventually {
    ($cond:expr, $what:expr) => {
        $crate::eventually::eventually($what, std::time::Duration::from_secs(10), || async {
            if $cond { Some(()) } else { None }
        })
        .await
    };
}
