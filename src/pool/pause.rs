//! PAUSE and RESUME: a paused tenant's (or, paused globally, every tenant's) new transactions
//! wait at checkout until it is resumed; transactions already running finish.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Default)]
pub struct Pauses {
    /// Anything paused at all: the one load the hot path pays.
    any: AtomicBool,
    all: AtomicBool,
    tenants: Mutex<HashSet<String>>,
    resumed: Notify,
}

impl Pauses {
    pub fn pause(&self, tenant: Option<&str>) {
        match tenant {
            None => self.all.store(true, Ordering::Release),
            Some(t) => {
                if let Ok(mut set) = self.tenants.lock() {
                    set.insert(t.to_string());
                }
            }
        }
        self.any.store(true, Ordering::Release);
    }

    /// Resumes `tenant`, or everything (the global pause and every tenant's) with None.
    pub fn resume(&self, tenant: Option<&str>) {
        let empty = match self.tenants.lock() {
            Ok(mut set) => {
                match tenant {
                    None => set.clear(),
                    Some(t) => {
                        set.remove(t);
                    }
                }
                set.is_empty()
            }
            Err(_) => true,
        };
        if tenant.is_none() {
            self.all.store(false, Ordering::Release);
        }
        if empty && !self.all.load(Ordering::Acquire) {
            self.any.store(false, Ordering::Release);
        }
        self.resumed.notify_waiters();
    }

    /// Whether anything at all is paused (one atomic load).
    pub fn any(&self) -> bool {
        self.any.load(Ordering::Acquire)
    }

    pub fn is_paused(&self, tenant: &str) -> bool {
        self.any.load(Ordering::Acquire)
            && (self.all.load(Ordering::Acquire)
                || self.tenants.lock().is_ok_and(|s| s.contains(tenant)))
    }

    /// Waits while `tenant` is paused, at most `limit`; false if still paused then.
    pub async fn wait(&self, tenant: &str, limit: Duration) -> bool {
        if !self.any.load(Ordering::Acquire) {
            return true;
        }
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let resumed = self.resumed.notified();
            tokio::pin!(resumed);
            resumed.as_mut().enable();
            if !self.is_paused(tenant) {
                return true;
            }
            if tokio::time::timeout_at(deadline, resumed).await.is_err() {
                return !self.is_paused(tenant);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pausing_one_tenant_leaves_the_others_running() {
        let p = Pauses::default();
        p.pause(Some("a"));
        assert!(p.is_paused("a"));
        assert!(!p.is_paused("b"));
        p.resume(Some("a"));
        assert!(!p.is_paused("a"));
    }

    #[test]
    fn a_global_pause_holds_everyone_and_a_global_resume_frees_everyone() {
        let p = Pauses::default();
        p.pause(None);
        p.pause(Some("a"));
        assert!(p.is_paused("b"));
        p.resume(None);
        assert!(!p.is_paused("a") && !p.is_paused("b"));
    }

    #[tokio::test]
    async fn a_waiting_checkout_goes_on_when_its_tenant_is_resumed() {
        let p = std::sync::Arc::new(Pauses::default());
        p.pause(Some("a"));
        let waiter = {
            let p = p.clone();
            tokio::spawn(async move { p.wait("a", Duration::from_secs(30)).await })
        };
        tokio::task::yield_now().await;
        p.resume(Some("a"));
        assert!(waiter.await.expect("join"));
    }
}
