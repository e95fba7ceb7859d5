//! A bandwidth limit shared by every sender of one replication run: a token bucket that
//! holds at most one second of credit, so a pause is never followed by a burst.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Throttle {
    /// Bytes per second; None: unlimited.
    rate: Option<u64>,
    /// When the bucket was last filled, and the credit it held then (may be negative:
    /// a sender that took more than was there waits until the debt is paid).
    state: Mutex<(Instant, f64)>,
}

impl Throttle {
    pub fn new(rate: Option<u64>) -> Throttle {
        Throttle {
            rate,
            state: Mutex::new((Instant::now(), 0.0)),
        }
    }

    /// Takes `bytes` of credit, sleeping as long as needed to stay under the rate.
    pub async fn take(&self, bytes: u64) {
        if let Some(wait) = self.debit(bytes, Instant::now()) {
            tokio::time::sleep(wait).await;
        }
    }

    /// Blocking form, for senders on plain threads.
    pub fn take_blocking(&self, bytes: u64) {
        if let Some(wait) = self.debit(bytes, Instant::now()) {
            std::thread::sleep(wait);
        }
    }

    fn debit(&self, bytes: u64, now: Instant) -> Option<Duration> {
        let rate = self.rate? as f64;
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (then, credit) = *state;
        let credit = (credit + now.duration_since(then).as_secs_f64() * rate).min(rate);
        let left = credit - bytes as f64;
        *state = (now, left);
        (left < 0.0).then(|| Duration::from_secs_f64(-left / rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let t = Throttle::new(None);
        assert_eq!(t.debit(u64::MAX, Instant::now()), None);
    }

    #[test]
    fn debt_is_paid_at_the_rate() {
        let t = Throttle::new(Some(1000));
        let now = t.state.lock().unwrap().0;
        // Starts with no credit: 500 bytes cost half a second.
        assert_eq!(t.debit(500, now), Some(Duration::from_millis(500)));
        // Another 500 at the same instant: a second in all.
        assert_eq!(t.debit(500, now), Some(Duration::from_secs(1)));
        // Two seconds later the debt is paid and one second of credit (not two) is there.
        let later = now + Duration::from_secs(3);
        assert_eq!(t.debit(1000, later), None);
        assert_eq!(t.debit(1, later), Some(Duration::from_millis(1)));
    }
}
