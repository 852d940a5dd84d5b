//! The instance's query rate: a token bucket.

use std::time::Instant;

/// A token bucket: `rate` tokens a second, holding `burst` at most.
#[derive(Debug)]
pub(super) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    pub(super) fn new(rate: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            rate: rate.max(f64::MIN_POSITIVE),
            burst,
            tokens: burst,
            refilled: Instant::now(),
        }
    }

    /// Takes a token, or says in how many whole seconds one will be there.
    pub(super) fn take(&mut self) -> Result<(), u64> {
        self.take_at(Instant::now())
    }

    fn take_at(&mut self, now: Instant) -> Result<(), u64> {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        Err(((1.0 - self.tokens) / self.rate).ceil().max(1.0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let mut bucket = TokenBucket::new(2.0, 3);
        let start = Instant::now();
        for _ in 0..3 {
            assert_eq!(bucket.take_at(start), Ok(()));
        }
        assert_eq!(bucket.take_at(start), Err(1));
        assert_eq!(bucket.take_at(start + Duration::from_millis(500)), Ok(()));
        assert!(bucket.take_at(start + Duration::from_millis(500)).is_err());
        // Idle time refills up to the burst, never beyond.
        let later = start + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(bucket.take_at(later), Ok(()));
        }
        assert!(bucket.take_at(later).is_err());
    }

    #[test]
    fn a_slow_rate_asks_for_a_longer_wait() {
        let mut bucket = TokenBucket::new(0.1, 1);
        let start = Instant::now();
        assert_eq!(bucket.take_at(start), Ok(()));
        assert_eq!(bucket.take_at(start), Err(10));
    }
}
