//! How many connections a pool keeps: a control loop that follows measured demand.
//!
//! Every tick (one a second) the pool reports how many of its connections are busy and how
//! many clients wait. Demand is `busy + waiting`, smoothed by an exponentially weighted moving
//! average with a 10 s time constant. The target:
//! - grows when the smoothed demand with 25 % headroom rises above it, and by one
//!   connection a tick while clients wait (additive increase: a momentary queue, say behind
//!   one slow login, does not make a pool claim connections it will not use);
//! - shrinks only after the smoothed demand has stayed below it for `SHRINK_AFTER_MS`
//!   (hysteresis, so a pool does not close connections it will want back a second later),
//!   then to the smoothed demand with headroom, but not below the peak demand (with headroom)
//!   seen in that window, so a periodic burst keeps its connections;
//! - stays within the pool's `min_connections` and `max_connections` (`pool_size`).
//!
//! The pool opens connections beyond its target whenever clients wait (up to its maximum and
//! the server's budget), so the target never delays a transaction; what it decides is how
//! many idle connections are kept (those beyond it close after `SURPLUS_IDLE_MS`).
//! Pure: time comes in with each sample, so tests script demand on a simulated clock.

/// Smoothing time constant of the demand average.
const TAU_MS: f64 = 10_000.0;
/// Headroom over the smoothed demand.
const HEADROOM: f64 = 1.25;
/// How long demand must stay below the target before it shrinks.
pub const SHRINK_AFTER_MS: u64 = 30_000;
/// How long a connection beyond the target may sit idle before it is closed.
pub const SURPLUS_IDLE_MS: u64 = 60_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub now_ms: u64,
    pub busy: u32,
    pub waiting: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The pool's reserved minimum.
    Minimum,
    /// Clients had to wait for a connection.
    Waiting,
    /// Smoothed concurrency rose.
    Demand,
    /// Connections sat idle for a while.
    Idle,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Minimum => "minimum",
            Reason::Waiting => "clients waiting",
            Reason::Demand => "demand rose",
            Reason::Idle => "idle connections",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resize {
    pub from: u32,
    pub to: u32,
    pub reason: Reason,
}

#[derive(Debug, Clone)]
pub struct Autoscaler {
    min: u32,
    max: u32,
    target: u32,
    reason: Reason,
    ewma: f64,
    last_ms: Option<u64>,
    /// Since when the smoothed demand has wanted fewer connections than the target.
    below_since_ms: Option<u64>,
    /// The highest demand since then.
    window_peak: u32,
}

impl Autoscaler {
    pub fn new(min: u32, max: u32) -> Self {
        let max = max.max(1);
        let min = min.min(max);
        Autoscaler {
            min,
            max,
            target: min,
            reason: Reason::Minimum,
            ewma: 0.0,
            last_ms: None,
            below_since_ms: None,
            window_peak: 0,
        }
    }

    pub fn target(&self) -> u32 {
        self.target
    }

    pub fn reason(&self) -> Reason {
        self.reason
    }

    /// Takes one sample; returns the resize it caused, if any.
    pub fn observe(&mut self, s: Sample) -> Option<Resize> {
        let demand = f64::from(s.busy + s.waiting);
        match self.last_ms {
            None => self.ewma = demand,
            Some(last) => {
                let dt = s.now_ms.saturating_sub(last) as f64;
                let alpha = 1.0 - (-dt / TAU_MS).exp();
                self.ewma += alpha * (demand - self.ewma);
            }
        }
        self.last_ms = Some(s.now_ms);
        let wanted = self.clamp((self.ewma * HEADROOM).ceil() as u32);
        let from = self.target;
        if wanted > self.target {
            self.reset_window();
            return self.set(wanted, Reason::Demand, from);
        }
        if s.waiting > 0 && s.busy + s.waiting > self.target {
            self.reset_window();
            return self.set(self.clamp(self.target + 1), Reason::Waiting, from);
        }
        if wanted < self.target && s.busy < self.target {
            let since = *self.below_since_ms.get_or_insert(s.now_ms);
            self.window_peak = self.window_peak.max(s.busy + s.waiting);
            if s.now_ms.saturating_sub(since) >= SHRINK_AFTER_MS {
                let peak = self.clamp((f64::from(self.window_peak) * HEADROOM).ceil() as u32);
                self.reset_window();
                self.window_peak = 0;
                let to = wanted.max(s.busy).max(peak);
                if to >= self.target {
                    return None;
                }
                let reason = if to == self.min {
                    Reason::Minimum
                } else {
                    Reason::Idle
                };
                return self.set(to, reason, from);
            }
        } else {
            self.reset_window();
        }
        None
    }

    fn reset_window(&mut self) {
        self.below_since_ms = None;
        self.window_peak = 0;
    }

    fn clamp(&self, n: u32) -> u32 {
        n.clamp(self.min, self.max)
    }

    fn set(&mut self, to: u32, reason: Reason, from: u32) -> Option<Resize> {
        if to == from {
            return None;
        }
        self.target = to;
        self.reason = if to < from && reason == Reason::Minimum {
            Reason::Idle
        } else {
            reason
        };
        Some(Resize {
            from,
            to,
            reason: self.reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds one sample a second from `start` for `secs` seconds; returns the resizes.
    fn run(a: &mut Autoscaler, start: u64, secs: u64, busy: u32, waiting: u32) -> Vec<Resize> {
        (0..secs)
            .filter_map(|i| {
                a.observe(Sample {
                    now_ms: start + i * 1000,
                    busy,
                    waiting,
                })
            })
            .collect()
    }

    #[test]
    fn a_new_pool_targets_its_minimum() {
        let a = Autoscaler::new(2, 10);
        assert_eq!((a.target(), a.reason()), (2, Reason::Minimum));
    }

    #[test]
    fn demand_grows_the_target_at_once() {
        let mut a = Autoscaler::new(0, 10);
        let r = a.observe(Sample {
            now_ms: 0,
            busy: 3,
            waiting: 4,
        });
        assert_eq!(
            r,
            Some(Resize {
                from: 0,
                to: 9,
                reason: Reason::Demand
            })
        );
    }

    #[test]
    fn a_momentary_queue_grows_the_target_a_step_not_to_the_queue() {
        let mut a = Autoscaler::new(0, 20);
        run(&mut a, 0, 120, 2, 0);
        let t = a.target();
        let r = a
            .observe(Sample {
                now_ms: 120_000,
                busy: t,
                waiting: 8,
            })
            .expect("a resize");
        assert!(r.to > t && r.to <= t + 2, "{t} -> {}", r.to);
    }

    #[test]
    fn clients_waiting_at_a_steady_demand_add_one_connection_a_tick() {
        let mut a = Autoscaler::new(0, 20);
        run(&mut a, 0, 120, 4, 0);
        let t = a.target();
        // Demand steady at the target, yet a client waits each tick.
        let grown = run(&mut a, 120_000, 3, t, 1);
        assert!(grown.iter().all(|r| r.to == r.from + 1), "{grown:?}");
        assert!(!grown.is_empty());
    }

    #[test]
    fn the_target_never_exceeds_the_maximum() {
        let mut a = Autoscaler::new(0, 5);
        run(&mut a, 0, 60, 5, 50);
        assert_eq!(a.target(), 5);
    }

    #[test]
    fn steady_demand_keeps_a_steady_target() {
        let mut a = Autoscaler::new(0, 20);
        run(&mut a, 0, 60, 4, 0);
        let t = a.target();
        assert!(run(&mut a, 60_000, 600, 4, 0).is_empty());
        assert_eq!(a.target(), t);
        assert!((4..=5).contains(&t), "target {t}");
    }

    #[test]
    fn the_target_shrinks_only_after_demand_stays_low() {
        let mut a = Autoscaler::new(1, 20);
        run(&mut a, 0, 10, 8, 2);
        assert!(a.target() >= 10);
        // Demand falls to one connection: nothing for a while...
        assert!(run(&mut a, 10_000, 20, 1, 0).is_empty());
        // ...then it shrinks, for idleness.
        let later = run(&mut a, 30_000, 120, 1, 0);
        assert!(!later.is_empty());
        assert!(later.iter().all(|r| r.to < r.from));
        assert!(a.target() <= 2, "target {}", a.target());
    }

    #[test]
    fn a_brief_dip_does_not_shrink_the_target() {
        let mut a = Autoscaler::new(0, 20);
        run(&mut a, 0, 30, 6, 0);
        let t = a.target();
        let mut ms = 30_000;
        for _ in 0..10 {
            // Ten seconds quiet, then a second busy again.
            assert!(run(&mut a, ms, 10, 0, 0).is_empty());
            run(&mut a, ms + 10_000, 1, 6, 0);
            ms += 11_000;
        }
        assert_eq!(a.target(), t);
    }

    #[test]
    fn an_idle_pool_falls_back_to_its_minimum() {
        let mut a = Autoscaler::new(2, 20);
        run(&mut a, 0, 5, 10, 5);
        run(&mut a, 5_000, 600, 0, 0);
        assert_eq!((a.target(), a.reason()), (2, Reason::Idle));
    }

    #[test]
    fn the_target_never_drops_below_what_is_busy() {
        let mut a = Autoscaler::new(0, 20);
        run(&mut a, 0, 5, 10, 0);
        // A sudden plateau of three busy: the average lags, the target stays >= 3.
        run(&mut a, 5_000, 300, 3, 0);
        assert!(a.target() >= 3);
    }
}
