//! What a failed send means: for the row, and for its whole lane. Pure.
//!
//! | failure | the row | the lane |
//! |---|---|---|
//! | 401 / 403 | pending again, attempt not counted | auth failed: paused, rechecked slowly or on a new key |
//! | no answer, 502 / 503 / 504 without `Retry-After` | pending, attempt counted, due at once | offline: probes on the backoff schedule |
//! | any retryable with `Retry-After` (429, 503) | due after it | backing off until then |
//! | 429 without `Retry-After` | row backoff | backing off for that delay |
//! | other retryable (408, 500) | row backoff | unchanged |
//! | anything else (other 4xx, a body the cloud refuses) | dead, with the cloud's error | unchanged |
//!
//! Row backoff is exponential in the row's own attempt count (kept in the row, so it survives
//! restarts) with full jitter: `random(0 ..= min(retry_max, retry_min · 2^attempts))`.

use std::time::Duration;

use crate::backoff::Backoff;
use crate::cloud::CloudError;
use crate::model::UnixMillis;

/// What happens to the row that failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Try again at `at`; `counted` adds one to its attempts.
    Retry { at: UnixMillis, counted: bool },
    /// Refused for good: kept as dead with this error.
    Dead(String),
}

/// What happens to the lane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaneEffect {
    None,
    /// Pause every request until `until` (rate limited).
    BackOff {
        until: UnixMillis,
    },
    /// The cloud does not answer: stop sending, probe.
    Offline,
    /// The key is refused: stop sending, wait for a new key or the slow recheck.
    AuthFailed,
}

/// The per-row retry schedule.
#[derive(Clone, Copy, Debug)]
pub struct RetrySchedule {
    pub min: Duration,
    pub max: Duration,
}

impl RetrySchedule {
    /// The delay before the next try of a row that has failed `attempts` times, drawn with
    /// `unit` in `[0, 1)`.
    pub fn delay(&self, attempts: u32, unit: f64) -> Duration {
        Backoff::after(self.min, self.max, attempts).next_with(unit)
    }
}

/// `now` plus `d`, saturating.
pub fn later(now: UnixMillis, d: Duration) -> UnixMillis {
    UnixMillis(
        now.0
            .saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
    )
}

/// Judges one failure of a row that had failed `attempts` times before.
pub fn judge(
    error: &CloudError,
    attempts: u32,
    schedule: RetrySchedule,
    now: UnixMillis,
    unit: f64,
) -> (Verdict, LaneEffect) {
    if error.is_auth() {
        return (
            Verdict::Retry {
                at: now,
                counted: false,
            },
            LaneEffect::AuthFailed,
        );
    }
    if !error.is_retryable() {
        return (Verdict::Dead(error.to_string()), LaneEffect::None);
    }
    if let Some(after) = error.retry_after() {
        let until = later(now, after);
        return (
            Verdict::Retry {
                at: until,
                counted: true,
            },
            LaneEffect::BackOff { until },
        );
    }
    if error.is_unreachable() {
        return (
            Verdict::Retry {
                at: now,
                counted: true,
            },
            LaneEffect::Offline,
        );
    }
    let at = later(now, schedule.delay(attempts, unit));
    let effect = if error.status() == Some(429) {
        LaneEffect::BackOff { until: at }
    } else {
        LaneEffect::None
    };
    (Verdict::Retry { at, counted: true }, effect)
}

/// Of several effects from one round of sends, the one the lane follows: auth failure first
/// (nothing else can work), then offline, then the longest back-off.
pub fn strongest(effects: impl IntoIterator<Item = LaneEffect>) -> LaneEffect {
    effects
        .into_iter()
        .fold(LaneEffect::None, |acc, e| match (acc, e) {
            (LaneEffect::AuthFailed, _) | (_, LaneEffect::AuthFailed) => LaneEffect::AuthFailed,
            (LaneEffect::Offline, _) | (_, LaneEffect::Offline) => LaneEffect::Offline,
            (LaneEffect::BackOff { until: a }, LaneEffect::BackOff { until: b }) => {
                LaneEffect::BackOff { until: a.max(b) }
            }
            (LaneEffect::BackOff { until }, LaneEffect::None)
            | (LaneEffect::None, LaneEffect::BackOff { until }) => LaneEffect::BackOff { until },
            (LaneEffect::None, LaneEffect::None) => LaneEffect::None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::{CloudError, Failure, status_error};
    use crate::model::Target;

    const SCHEDULE: RetrySchedule = RetrySchedule {
        min: Duration::from_secs(1),
        max: Duration::from_secs(60),
    };
    const NOW: UnixMillis = UnixMillis(1_000_000);

    fn status(code: u16, retry_after: Option<u64>) -> CloudError {
        status_error(
            Target::NetNeural,
            "POST /rest/v1/x",
            code,
            retry_after.map(Duration::from_secs),
            b"",
            |_| None,
        )
    }

    fn transport() -> CloudError {
        CloudError {
            target: Target::Golioth,
            request: "GET /v1/x".into(),
            failure: Failure::Transport {
                timeout: false,
                detail: "connection refused".into(),
            },
            retry_after: None,
        }
    }

    #[test]
    fn each_failure_has_its_row_verdict_and_lane_effect() {
        let cases: Vec<(CloudError, Verdict, LaneEffect)> = vec![
            (
                status(401, None),
                Verdict::Retry {
                    at: NOW,
                    counted: false,
                },
                LaneEffect::AuthFailed,
            ),
            (
                status(403, Some(5)),
                Verdict::Retry {
                    at: NOW,
                    counted: false,
                },
                LaneEffect::AuthFailed,
            ),
            (
                transport(),
                Verdict::Retry {
                    at: NOW,
                    counted: true,
                },
                LaneEffect::Offline,
            ),
            (
                status(503, None),
                Verdict::Retry {
                    at: NOW,
                    counted: true,
                },
                LaneEffect::Offline,
            ),
            (
                status(429, Some(7)),
                Verdict::Retry {
                    at: UnixMillis(NOW.0 + 7000),
                    counted: true,
                },
                LaneEffect::BackOff {
                    until: UnixMillis(NOW.0 + 7000),
                },
            ),
            (
                status(503, Some(2)),
                Verdict::Retry {
                    at: UnixMillis(NOW.0 + 2000),
                    counted: true,
                },
                LaneEffect::BackOff {
                    until: UnixMillis(NOW.0 + 2000),
                },
            ),
            (
                status(429, None),
                Verdict::Retry {
                    at: UnixMillis(NOW.0 + 4000),
                    counted: true,
                },
                LaneEffect::BackOff {
                    until: UnixMillis(NOW.0 + 4000),
                },
            ),
            (
                status(500, None),
                Verdict::Retry {
                    at: UnixMillis(NOW.0 + 4000),
                    counted: true,
                },
                LaneEffect::None,
            ),
        ];
        for (error, verdict, effect) in cases {
            // attempts = 3, unit = 0.5: half of min(60 s, 1 s · 2³) = 4 s.
            assert_eq!(
                judge(&error, 3, SCHEDULE, NOW, 0.5),
                (verdict, effect),
                "{error}"
            );
        }
        let (verdict, effect) = judge(&status(400, None), 0, SCHEDULE, NOW, 0.5);
        assert!(matches!(verdict, Verdict::Dead(e) if e.contains("HTTP 400")));
        assert_eq!(effect, LaneEffect::None);
    }

    #[test]
    fn row_delays_grow_to_the_cap() {
        assert_eq!(SCHEDULE.delay(0, 1.0), Duration::from_secs(1));
        assert_eq!(SCHEDULE.delay(5, 1.0), Duration::from_secs(32));
        assert_eq!(SCHEDULE.delay(50, 1.0), Duration::from_secs(60));
        assert_eq!(SCHEDULE.delay(50, 0.0), Duration::ZERO);
    }

    #[test]
    fn auth_beats_offline_beats_the_longest_backoff() {
        let b = |ms| LaneEffect::BackOff {
            until: UnixMillis(ms),
        };
        assert_eq!(strongest([b(5), b(9), LaneEffect::None]), b(9));
        assert_eq!(strongest([b(5), LaneEffect::Offline]), LaneEffect::Offline);
        assert_eq!(
            strongest([LaneEffect::Offline, LaneEffect::AuthFailed, b(1)]),
            LaneEffect::AuthFailed
        );
        assert_eq!(strongest([]), LaneEffect::None);
    }
}
