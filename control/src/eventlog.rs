//! rigd's event log: every event gets a sequence number, the last `capacity` are retained for
//! replay (`Watch` from a sequence number, SSE `Last-Event-ID`), and followers get new events
//! through a bounded broadcast: a slow follower never slows rigd down, it is told how many events
//! it missed.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::SystemTime;

use rig_proto::v1 as pb;

use crate::events::{EventData, MAX_FIELD_BYTES, SCHEMA_VERSION};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

/// The default byte budget of the retained events: 64 MiB of their JSON.
pub const DEFAULT_EVENTS_BUDGET: usize = 64 << 20;

/// One logged event: the envelope plus typed [`EventData`], serialised only at the edges.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub seq: u64,
    pub time: SystemTime,
    pub env: String,
    pub service: String,
    pub edge: String,
    pub data: EventData,
}

impl Event {
    /// The envelope's type (`request.completed`), what filters match.
    pub fn kind(&self) -> &'static str {
        self.data.kind()
    }

    /// The one-line summary.
    pub fn message(&self) -> String {
        self.data.summary(&self.env, &self.service, &self.edge)
    }

    pub fn to_pb(&self) -> pb::Event {
        pb::Event {
            seq: self.seq,
            r#type: self.kind().into(),
            time: unix_secs(self.time),
            env: self.env.clone(),
            service: self.service.clone(),
            edge: self.edge.clone(),
            message: self.message(),
            data_json: serde_json::to_string(&self.data).unwrap_or_default(),
        }
    }

    /// The JSON object served on `/events` and by `rigctl events --json`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "v": SCHEMA_VERSION,
            "seq": self.seq,
            "type": self.kind(),
            "time": unix_secs(self.time),
            "env": self.env,
            "service": self.service,
            "edge": self.edge,
            "message": self.message(),
            "data": self.data,
        })
    }
}

pub fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// What to publish; the log assigns `seq` and `time`.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub env: String,
    pub service: String,
    pub edge: String,
    pub data: EventData,
}

impl NewEvent {
    /// An event about `service` (empty: the environment) of `env`.
    pub fn service(env: &str, service: &str, data: EventData) -> Self {
        NewEvent {
            env: env.into(),
            service: service.into(),
            edge: String::new(),
            data,
        }
    }
}

/// A filter over events, as `Watch` and `/events` take it.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Type prefixes; empty: all.
    pub types: Vec<String>,
    pub env: String,
    pub service: String,
    pub edge: String,
}

impl Filter {
    pub fn matches(&self, e: &Event) -> bool {
        (self.types.is_empty() || self.types.iter().any(|t| e.kind().starts_with(t.as_str())))
            && (self.env.is_empty() || self.env == e.env)
            && (self.service.is_empty() || self.service == e.service)
            && (self.edge.is_empty() || self.edge == e.edge)
    }
}

#[derive(Debug)]
struct Inner {
    next_seq: u64,
    /// Each retained event with its approximate size in bytes.
    retained: VecDeque<(Arc<Event>, usize)>,
    retained_bytes: usize,
}

/// The log. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct EventLog {
    inner: Mutex<Inner>,
    capacity: usize,
    byte_budget: usize,
    tx: broadcast::Sender<Arc<Event>>,
}

impl EventLog {
    /// Retain at most `capacity` events and about `byte_budget` bytes of them (their JSON size),
    /// oldest dropped first; followers may fall `follow_buffer` events behind before they are
    /// told they lagged.
    pub fn new(capacity: usize, byte_budget: usize, follow_buffer: usize) -> Self {
        let (tx, _) = broadcast::channel(follow_buffer.max(16));
        EventLog {
            inner: Mutex::new(Inner {
                next_seq: 1,
                retained: VecDeque::with_capacity(capacity.min(1 << 16)),
                retained_bytes: 0,
            }),
            capacity: capacity.max(1),
            byte_budget,
            tx,
        }
    }

    /// Log an event; returns its sequence number. Free-text fields over
    /// [`MAX_FIELD_BYTES`] are truncated first.
    pub fn publish(&self, e: NewEvent) -> u64 {
        metrics::counter!("rig_events_total").increment(1);
        let mut data = e.data;
        data.truncate_fields(MAX_FIELD_BYTES);
        let size = data.approx_size() + e.env.len() + e.service.len() + e.edge.len() + 64;
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let seq = inner.next_seq;
        inner.next_seq += 1;
        let event = Arc::new(Event {
            seq,
            time: SystemTime::now(),
            env: e.env,
            service: e.service,
            edge: e.edge,
            data,
        });
        if inner.retained.len() == self.capacity
            && let Some((_, s)) = inner.retained.pop_front()
        {
            inner.retained_bytes -= s;
        }
        let mut evicted = 0;
        while inner.retained_bytes + size > self.byte_budget
            && let Some((_, s)) = inner.retained.pop_front()
        {
            inner.retained_bytes -= s;
            evicted += 1;
        }
        if evicted > 0 {
            metrics::counter!("rig_events_evicted_total").increment(evicted);
        }
        inner.retained_bytes += size;
        inner.retained.push_back((event.clone(), size));
        // Sent under the lock so followers see events in sequence order.
        let _ = self.tx.send(event);
        seq
    }

    /// The approximate bytes the retained events take (their JSON size).
    pub fn retained_bytes(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retained_bytes
    }

    /// Subscribe to new events and take the retained ones after `after_seq`, atomically: no
    /// event is missed or seen twice between the replay and the live stream.
    pub fn replay_and_follow(
        &self,
        after_seq: u64,
    ) -> (Vec<Arc<Event>>, broadcast::Receiver<Arc<Event>>) {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let rx = self.tx.subscribe();
        let replay = inner
            .retained
            .iter()
            .filter(|(e, _)| e.seq > after_seq)
            .map(|(e, _)| e.clone())
            .collect();
        (replay, rx)
    }

    /// The sequence number of the newest event (0 when none).
    pub fn last_seq(&self) -> u64 {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next_seq
            - 1
    }
}

/// What a follower of the log receives.
#[derive(Debug, Clone)]
pub enum Followed {
    Event(Arc<Event>),
    /// The follower fell behind the live stream and missed `missed` events; it can resume from
    /// the log with `after_seq = resume_after`.
    Lagged {
        missed: u64,
        resume_after: u64,
    },
}

impl EventLog {
    /// Replay the retained events after `after` that match `filter`, then, with `follow`, the
    /// new ones as they come, until `stop` or until the receiver is dropped. A follower that
    /// reads too slowly gets a [`Followed::Lagged`] note instead of slowing the log down.
    pub fn follow(
        &self,
        after: u64,
        filter: Filter,
        follow: bool,
        stop: CancellationToken,
    ) -> mpsc::Receiver<Followed> {
        let (replay, mut live) = self.replay_and_follow(after);
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            let mut last = after;
            for e in replay {
                last = e.seq;
                if filter.matches(&e) && tx.send(Followed::Event(e)).await.is_err() {
                    return;
                }
            }
            if !follow {
                return;
            }
            loop {
                let next = tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tx.closed() => return,
                    r = live.recv() => r,
                };
                let item = match next {
                    // Already replayed.
                    Ok(e) if e.seq <= last => continue,
                    Ok(e) => {
                        last = e.seq;
                        if !filter.matches(&e) {
                            continue;
                        }
                        Followed::Event(e)
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => Followed::Lagged {
                        missed,
                        resume_after: last,
                    },
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if tx.send(item).await.is_err() {
                    return;
                }
            }
        });
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event of type `kind` (the sample of that type), or a log line `kind`.
    fn ev(kind: &str) -> NewEvent {
        let data = crate::events::samples()
            .into_iter()
            .find(|d| d.kind() == kind)
            .unwrap_or(EventData::ServiceLog {
                stream: "stdout".into(),
                line: kind.into(),
            });
        NewEvent::service("", "", data)
    }

    #[tokio::test]
    async fn replay_then_follow_without_gaps() {
        let log = EventLog::new(3, DEFAULT_EVENTS_BUDGET, 16);
        for k in ["a", "b", "c", "d"] {
            log.publish(ev(k));
        }
        let (replay, mut rx) = log.replay_and_follow(1);
        // "a" fell out of retention; 2..=4 remain.
        assert_eq!(
            replay.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        log.publish(ev("e"));
        assert_eq!(rx.recv().await.unwrap().seq, 5);
        assert_eq!(log.last_seq(), 5);
    }

    #[tokio::test]
    async fn a_follower_gets_the_replay_then_live_events_filtered() {
        let log = EventLog::new(100, DEFAULT_EVENTS_BUDGET, 16);
        log.publish(ev("service.ready"));
        log.publish(ev("request.completed"));
        let filter = Filter {
            types: vec!["service.".into()],
            ..Default::default()
        };
        let mut rx = log.follow(0, filter, true, CancellationToken::new());
        log.publish(ev("request.completed"));
        log.publish(ev("service.stopped"));
        let mut kinds = Vec::new();
        for _ in 0..2 {
            match rx.recv().await.unwrap() {
                Followed::Event(e) => kinds.push(e.kind()),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(kinds, vec!["service.ready", "service.stopped"]);
    }

    #[tokio::test]
    async fn a_slow_follower_is_told_how_many_it_missed() {
        let log = EventLog::new(1000, DEFAULT_EVENTS_BUDGET, 16);
        let mut rx = log.follow(0, Filter::default(), true, CancellationToken::new());
        // Let the follower task subscribe and park, then outrun its buffer without reading.
        tokio::task::yield_now().await;
        for _ in 0..2000 {
            log.publish(ev("request.completed"));
        }
        let mut lagged = 0;
        while let Ok(Some(item)) =
            tokio::time::timeout(std::time::Duration::from_millis(200), rx.recv()).await
        {
            if let Followed::Lagged { missed, .. } = item {
                lagged += missed;
            }
        }
        assert!(lagged > 0, "the follower was told it missed events");
    }

    #[test]
    fn the_byte_budget_evicts_the_oldest_events() {
        let budget = 300 * 1024;
        let log = EventLog::new(1000, budget, 16);
        let big = |i: usize| {
            NewEvent::service(
                "shop",
                "web",
                EventData::ServiceLog {
                    stream: "stdout".into(),
                    line: format!("{i} {}", "x".repeat(100 * 1024)),
                },
            )
        };
        for i in 0..10 {
            log.publish(big(i));
        }
        assert!(log.retained_bytes() <= budget, "{}", log.retained_bytes());
        let (replay, _rx) = log.replay_and_follow(0);
        // Each line was cut to 64 KiB, so four fit in 300 KiB: the newest four.
        assert_eq!(
            replay.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![7, 8, 9, 10]
        );
        let EventData::ServiceLog { line, .. } = &replay[3].data else {
            panic!("{:?}", replay[3]);
        };
        assert!(line.starts_with("9 x"), "oldest dropped first");
        assert!(line.contains("…[truncated "), "the line says it was cut");
    }

    #[test]
    fn the_edges_serialise_the_typed_event() {
        let log = EventLog::new(10, DEFAULT_EVENTS_BUDGET, 16);
        log.publish(ev("service.stopped"));
        let (replay, _rx) = log.replay_and_follow(0);
        let e = &replay[0];
        let json = e.to_json();
        assert_eq!(json["v"], 1);
        assert_eq!(json["type"], "service.stopped");
        assert_eq!(json["data"]["exit"], "exited with status 0");
        let pb = e.to_pb();
        assert_eq!(pb.message, " exited with status 0");
        let back: EventData = serde_json::from_str(&pb.data_json).unwrap();
        assert_eq!(back, e.data);
    }

    #[test]
    fn filter_by_prefix_and_labels() {
        let e = Event {
            seq: 1,
            time: SystemTime::now(),
            env: "shop".into(),
            service: "web".into(),
            edge: "web/store".into(),
            data: crate::events::samples()
                .into_iter()
                .find(|d| d.kind() == "request.completed")
                .expect("a sample"),
        };
        let f = Filter {
            types: vec!["request.".into()],
            env: "shop".into(),
            ..Default::default()
        };
        assert!(f.matches(&e));
        let f = Filter {
            service: "store".into(),
            ..Default::default()
        };
        assert!(!f.matches(&e));
    }
}
