//! Exponential backoff with full jitter: the one policy for reconnects and retries.
//!
//! Pure apart from the random draw, which is injectable for tests.

use std::time::Duration;

/// `delay(n) = random(0 ..= min(cap, base * 2^n))` ("full jitter"), so a fleet of gateways
/// that lost the same uplink do not come back in lockstep.
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap: cap.max(base),
            attempt: 0,
        }
    }

    /// A backoff that has already counted `attempts` failures: the per-row retry delay, whose
    /// attempt count lives in the outbox row so that it survives restarts.
    pub fn after(base: Duration, cap: Duration, attempts: u32) -> Backoff {
        Backoff {
            attempt: attempts,
            ..Backoff::new(base, cap)
        }
    }

    /// The ceiling of the next delay, before jitter.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The next delay, drawn with `unit` in `[0, 1)`, and counts the attempt.
    pub fn next_with(&mut self, unit: f64) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// The next delay with a random draw.
    pub fn next_delay(&mut self) -> Duration {
        self.next_with(fastrand::f64())
    }

    /// Call after a success: the next failure starts from `base` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_up_to_the_cap_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let ceilings: Vec<u128> = (0..6)
            .map(|_| {
                let c = b.ceiling().as_millis();
                b.next_with(1.0);
                c
            })
            .collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn jitter_stays_within_the_ceiling_and_huge_attempt_counts_do_not_overflow() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(60));
        for _ in 0..200 {
            let ceiling = b.ceiling();
            assert!(b.next_delay() <= ceiling);
        }
        assert_eq!(b.ceiling(), Duration::from_secs(60));
        assert_eq!(b.next_with(0.0), Duration::ZERO);
    }
}
