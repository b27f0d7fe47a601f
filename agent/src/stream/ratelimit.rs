//! Sans-I/O token bucket, and parsing of rates such as `10MiB/s`.

use std::time::{Duration, Instant};

use super::StreamError;

/// A token bucket that tells the caller how long to wait; it never sleeps.
///
/// Tokens are bytes. The bucket starts full and may go into debt: a
/// reservation larger than the tokens at hand is granted, and the wait it
/// returns is the time the refill needs to pay the debt back. So the long-run
/// average is exactly the rate, and at most `burst` bytes go out above it.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl TokenBucket {
    /// `rate_bytes_per_sec` 0 means unlimited (every reservation is free).
    pub fn new(rate_bytes_per_sec: u64, burst_bytes: u64) -> Self {
        let burst = burst_bytes as f64;
        TokenBucket {
            rate: rate_bytes_per_sec as f64,
            burst,
            tokens: burst,
            last: None,
        }
    }

    /// Takes `n` bytes' worth of tokens at `now`, and returns how long to wait
    /// before sending them (zero when the tokens were there).
    pub fn reserve(&mut self, now: Instant, n: u64) -> Duration {
        if self.rate <= 0.0 {
            return Duration::ZERO;
        }
        if let Some(last) = self.last {
            // An Instant earlier than the last one refills nothing.
            let elapsed = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        }
        self.last = Some(self.last.map_or(now, |last| last.max(now)));
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Parses a rate in bytes per second: `20000000`, `500KiB/s`, `10MiB`,
/// `1.5MB/s`. Units: B, kB/KB/MB/GB (powers of 1000), KiB/MiB/GiB (powers of
/// 1024); the `/s` is optional. `0` means unlimited to the callers.
pub fn parse_rate(s: &str) -> Result<u64, StreamError> {
    let bad = |reason: &str| StreamError::InvalidRate {
        value: s.to_string(),
        reason: format!("{reason} (expected e.g. 10MiB/s, 500KiB/s, 1.5MB/s or 20000000)"),
    };
    let trimmed = s.trim();
    let body = trimmed.strip_suffix("/s").unwrap_or(trimmed).trim_end();
    let split = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (number, unit) = body.split_at(split);
    let multiplier: u64 = match unit.trim_start() {
        "" | "B" => 1,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => return Err(bad(&format!("unknown unit {other:?}"))),
    };
    if number.is_empty() {
        return Err(bad("no number"));
    }
    if let Ok(whole) = number.parse::<u64>() {
        return whole
            .checked_mul(multiplier)
            .ok_or_else(|| bad("too large"));
    }
    let value: f64 = number.parse().map_err(|_| bad("not a number"))?;
    let bytes = (value * multiplier as f64).round();
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(bad("too large"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn long_run_average_is_the_rate() {
        let rate = 8 * MIB;
        let mut bucket = TokenBucket::new(rate, 256 * 1024);
        let start = Instant::now();
        let mut now = start;
        let mut sent = 0u64;
        // Uneven chunk sizes, as zstd produces them.
        for i in 0..5_000u64 {
            let n = 1_000 + (i * 7_919) % 200_000;
            now += bucket.reserve(now, n);
            sent += n;
        }
        let measured = sent as f64 / (now - start).as_secs_f64();
        let error = (measured - rate as f64).abs() / rate as f64;
        assert!(
            error < 0.01,
            "measured {measured:.0} B/s for a rate of {rate}"
        );
    }

    #[test]
    fn idle_time_accrues_at_most_one_burst() {
        let burst = 100_000;
        let mut bucket = TokenBucket::new(1_000_000, burst);
        let t0 = Instant::now();
        assert_eq!(bucket.reserve(t0, 10), Duration::ZERO);
        // An hour idle refills the bucket to `burst`, not to an hour of rate.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(bucket.reserve(later, burst), Duration::ZERO);
        let wait = bucket.reserve(later, 500_000);
        assert_eq!(wait, Duration::from_millis(500));
    }

    #[test]
    fn reservation_larger_than_burst_waits_for_the_debt() {
        let mut bucket = TokenBucket::new(1_000, 100);
        let t0 = Instant::now();
        assert_eq!(bucket.reserve(t0, 1_100), Duration::from_secs(1));
        // Sending right away instead of waiting only deepens the debt.
        assert_eq!(bucket.reserve(t0, 1_000), Duration::from_secs(2));
    }

    #[test]
    fn clock_going_backwards_refills_nothing() {
        let mut bucket = TokenBucket::new(1_000, 1_000);
        let t1 = Instant::now() + Duration::from_secs(10);
        assert_eq!(bucket.reserve(t1, 1_000), Duration::ZERO);
        let wait = bucket.reserve(t1 - Duration::from_secs(5), 500);
        assert_eq!(wait, Duration::from_millis(500));
    }

    #[test]
    fn rate_zero_is_unlimited() {
        let mut bucket = TokenBucket::new(0, 0);
        assert_eq!(bucket.reserve(Instant::now(), u64::MAX), Duration::ZERO);
    }

    #[test]
    fn parses_rates() {
        assert_eq!(parse_rate("10MiB/s").unwrap(), 10 * MIB);
        assert_eq!(parse_rate("10MiB").unwrap(), 10 * MIB);
        assert_eq!(parse_rate("500KiB/s").unwrap(), 500 * 1024);
        assert_eq!(parse_rate("1.5MB/s").unwrap(), 1_500_000);
        assert_eq!(parse_rate("20000000").unwrap(), 20_000_000);
        assert_eq!(parse_rate("4096B").unwrap(), 4096);
        assert_eq!(parse_rate("2 GiB/s").unwrap(), 2 << 30);
        assert_eq!(parse_rate("0").unwrap(), 0);
    }

    #[test]
    fn rejects_bad_rates_naming_the_value() {
        for bad in [
            "",
            "fast",
            "10Mb/s",
            "-5MiB",
            "1.2.3MB",
            "MiB/s",
            "99999999999999GiB",
        ] {
            let err = parse_rate(bad).expect_err(bad).to_string();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
        let err = parse_rate("10 furlongs").unwrap_err().to_string();
        assert!(err.contains("unknown unit \"furlongs\""), "{err}");
    }
}
