//! A sub-millisecond timer for injected latency (per request and per tcp chunk).
//!
//! tokio's timer has a 1 ms tick, rounds deadlines up to the next tick and parks with a
//! millisecond timeout, so a sleep ends on average ~1 ms (up to 2 ms) late. Latency has to be
//! accurate to well under a millisecond, so chunk deadlines are kept here instead: one
//! background thread sleeps on a condition variable (nanosecond timeouts) until the earliest
//! deadline and wakes the waiting tasks. A thread that cannot be started falls back to tokio's
//! timer.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant as StdInstant};

use tokio::time::Instant;

/// How much of a sleep is left to the precise timer; the rest goes through tokio's.
const PRECISE_TAIL: Duration = Duration::from_millis(2);

/// Sleep until `t`, to within the OS's timer slack (~50 µs) instead of tokio's 1 ms tick.
///
/// The bulk of the wait goes through tokio's timer, so tokio's paused test clock still drives
/// long delays; only the last couple of milliseconds are measured in real time here.
pub(crate) async fn sleep_until(t: Instant) {
    if let Some(coarse) = t.checked_sub(PRECISE_TAIL)
        && coarse > Instant::now()
    {
        tokio::time::sleep_until(coarse).await;
    }
    let left = t.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return;
    }
    let t = StdInstant::now() + left;
    match timer() {
        Some(shared) => {
            Sleep {
                shared,
                deadline: t,
                key: None,
            }
            .await
        }
        None => tokio::time::sleep(left).await,
    }
}

type Key = (StdInstant, u64);

#[derive(Default)]
struct State {
    /// Waiting tasks by deadline (and a unique id, as deadlines repeat).
    waiting: BTreeMap<Key, Waker>,
    next_id: u64,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when a new earliest deadline arrives.
    earlier: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn timer() -> Option<&'static Arc<Shared>> {
    static TIMER: OnceLock<Option<Arc<Shared>>> = OnceLock::new();
    TIMER
        .get_or_init(|| {
            let shared = Arc::new(Shared {
                state: Mutex::new(State::default()),
                earlier: Condvar::new(),
            });
            let for_thread = shared.clone();
            match std::thread::Builder::new()
                .name("rig-tcp-timer".into())
                .spawn(move || run(&for_thread))
            {
                Ok(_) => Some(shared),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot start the latency timer thread; using tokio's timer");
                    None
                }
            }
        })
        .as_ref()
}

fn run(shared: &Shared) {
    let mut due = Vec::new();
    let mut st = shared.lock();
    loop {
        let now = StdInstant::now();
        while let Some(entry) = st.waiting.first_entry() {
            if entry.key().0 > now {
                break;
            }
            due.push(entry.remove());
        }
        if !due.is_empty() {
            // Wake outside the lock: a waker may run the task's poll right here.
            drop(st);
            for w in due.drain(..) {
                w.wake();
            }
            st = shared.lock();
            continue;
        }
        st = match st.waiting.first_key_value() {
            Some(((t, _), _)) => {
                let wait = t.saturating_duration_since(now);
                shared
                    .earlier
                    .wait_timeout(st, wait)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0)
            }
            None => shared.earlier.wait(st).unwrap_or_else(|e| e.into_inner()),
        };
    }
}

struct Sleep {
    shared: &'static Arc<Shared>,
    deadline: StdInstant,
    /// Our entry in the waiting set, if registered.
    key: Option<Key>,
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if StdInstant::now() >= self.deadline {
            self.deregister();
            return Poll::Ready(());
        }
        let mut st = self.shared.lock();
        if let Some(key) = self.key
            && let Some(w) = st.waiting.get_mut(&key)
        {
            if !w.will_wake(cx.waker()) {
                w.clone_from(cx.waker());
            }
            return Poll::Pending;
        }
        // Not registered yet, or woken early (the entry is gone): register.
        let key = (self.deadline, st.next_id);
        st.next_id += 1;
        st.waiting.insert(key, cx.waker().clone());
        let first = st.waiting.first_key_value().is_some_and(|(k, _)| *k == key);
        drop(st);
        self.key = Some(key);
        if first {
            self.shared.earlier.notify_one();
        }
        Poll::Pending
    }
}

impl Sleep {
    fn deregister(&mut self) {
        if let Some(key) = self.key.take() {
            self.shared.lock().waiting.remove(&key);
        }
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        self.deregister();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn never_early_and_less_late_than_tokio_s_timer() {
        // Interleaved, so both timers see the same load.
        let (mut ours, mut tokio_s) = (Vec::new(), Vec::new());
        for _ in 0..21 {
            let t = Instant::now() + Duration::from_millis(3);
            sleep_until(t).await;
            let now = Instant::now();
            assert!(now >= t, "woke {:?} early", t - now);
            ours.push(now - t);

            let t = Instant::now() + Duration::from_millis(3);
            tokio::time::sleep_until(t).await;
            tokio_s.push(Instant::now() - t);
        }
        ours.sort();
        tokio_s.sort();
        assert!(
            ours[10] < tokio_s[10],
            "median lateness {:?}, tokio's {:?}",
            ours[10],
            tokio_s[10]
        );
    }

    #[tokio::test]
    async fn dropped_sleeps_leave_no_entry() {
        let far = Instant::now() + Duration::from_secs(60);
        let _ = tokio::time::timeout(Duration::from_millis(5), sleep_until(far)).await;
        let shared = timer().expect("timer thread");
        assert!(
            !shared
                .lock()
                .waiting
                .keys()
                .any(|(t, _)| *t == far.into_std())
        );
    }
}
