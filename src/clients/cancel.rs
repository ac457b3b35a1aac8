//! Cancel keys pgtenant issues to its clients, and what each one may cancel.
//!
//! A client never sees a backend's real key: its BackendKeyData carries a random (pid, secret)
//! minted here, and a CancelRequest is forwarded only if the secret matches (compared in
//! constant time) and the client is currently linked to a backend.
//!
//! Behind one address, several instances share the clients: a key's process id carries its
//! instance's `peer_id` in its top bits (as PgBouncer's peers do), and a CancelRequest for
//! another instance's key is sent on to that instance, which checks it as its own.

use std::os::fd::RawFd;
use std::sync::Arc;

use dashmap::DashMap;
use futures_util::task::AtomicWaker;
use rand::Rng;
use subtle::ConstantTimeEq;

use crate::backend::connection::CancelTarget;

pub use crate::config::MAX_PEER_ID;
/// A key's `peer_id` bits: 11 above the 20 random bits of a process id, which stays positive.
const PEER_BITS: u32 = 11;
const _: () = assert!(MAX_PEER_ID as u32 == (1 << PEER_BITS) - 1);
const LOCAL_BITS: u32 = 20;

/// The instance a key's process id was minted by (0: an instance without peers).
pub fn peer_of(pid: u32) -> u16 {
    (pid >> LOCAL_BITS) as u16 & MAX_PEER_ID
}

/// Where another instance takes cancel requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub host: String,
    pub port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CancelKey {
    pub pid: u32,
    pub secret: u32,
}

/// Who a client is, for the admin console's SHOW CLIENTS.
#[derive(Debug, Clone)]
/// Kept for every client while it is connected, so it is small: names are shared with the
/// client's pool, and the rest sized to fit.
pub struct ClientInfo {
    pub role: Arc<str>,
    pub database: Arc<str>,
    pub addr: std::net::SocketAddr,
    pub application_name: Box<str>,
    pub connected: std::time::SystemTime,
    /// Protocol and cipher suite when the client uses TLS.
    pub tls: Option<Box<str>>,
}

/// One client as SHOW CLIENTS lists it.
#[derive(Debug, Clone)]
pub struct ClientView {
    pub pid: u32,
    pub tenant: Arc<str>,
    pub info: Option<ClientInfo>,
    /// Holding a server connection now.
    pub linked: bool,
}

struct Entry {
    secret: u32,
    tenant: Arc<str>,
    info: Option<ClientInfo>,
    /// The client's socket while the session owns it (-1 after), so an operator's
    /// `tenant suspend --terminate` can wake the session; guarded so the descriptor is never
    /// touched after the session closed it. With it, why the session was told to end, once it
    /// was.
    control: std::sync::Mutex<Control>,
    /// The backend the client was last linked to, kept while it is unlinked, and whether it is
    /// linked now. Linking changes at every transaction in transaction mode, and a client
    /// often gets the same backend again: then linking and unlinking are each one plain
    /// store, with no lock and no reference count touched.
    target: std::sync::Mutex<Option<Arc<CancelTarget>>>,
    linked: std::sync::atomic::AtomicBool,
    /// The task of a transaction-mode session waiting for its idle client, woken when
    /// pgtenant starts shutting down (smaller than a `Notify` waiter in every idle task).
    drain_waker: AtomicWaker,
}

struct Control {
    socket: RawFd,
    terminated: Option<Box<str>>,
}

#[derive(Default)]
pub struct CancelRegistry {
    entries: DashMap<u32, Arc<Entry>>,
    /// This instance's `peer_id` (0: no peers) and the other instances by theirs.
    peer_id: u16,
    peers: std::collections::HashMap<u16, Peer>,
    /// Shutting down: sessions end once their client is between transactions.
    draining: std::sync::atomic::AtomicBool,
    drain: tokio::sync::Notify,
}

impl CancelRegistry {
    /// A registry for instance `peer_id` among `peers`.
    pub fn with_peers(peer_id: u16, peers: std::collections::HashMap<u16, Peer>) -> Self {
        CancelRegistry {
            peer_id,
            peers,
            ..CancelRegistry::default()
        }
    }

    /// Mints a key for a new client. The guard removes it when the client goes away.
    pub fn register(self: &Arc<Self>, tenant: &str, socket: RawFd) -> CancelGuard {
        self.register_client(Arc::from(tenant), socket, None)
    }

    /// `register`, with what SHOW CLIENTS tells of the client.
    pub fn register_client(
        self: &Arc<Self>,
        tenant: Arc<str>,
        socket: RawFd,
        mut info: Option<ClientInfo>,
    ) -> CancelGuard {
        let mut rng = rand::thread_rng();
        loop {
            let pid = if self.peer_id == 0 {
                rng.gen_range(1..=i32::MAX as u32)
            } else {
                (u32::from(self.peer_id) << LOCAL_BITS) | rng.gen_range(0..1u32 << LOCAL_BITS)
            };
            let secret = rng.gen();
            if let dashmap::Entry::Vacant(v) = self.entries.entry(pid) {
                let entry = Arc::new(Entry {
                    secret,
                    tenant: tenant.clone(),
                    info: info.take(),
                    control: std::sync::Mutex::new(Control {
                        socket,
                        terminated: None,
                    }),
                    target: std::sync::Mutex::new(None),
                    linked: std::sync::atomic::AtomicBool::new(false),
                    drain_waker: AtomicWaker::new(),
                });
                v.insert(entry.clone());
                return CancelGuard {
                    registry: self.clone(),
                    entry,
                    pid: std::sync::atomic::AtomicU32::new(pid),
                    secret,
                    target_addr: std::sync::atomic::AtomicUsize::new(0),
                    drain_registered: Default::default(),
                };
            }
        }
    }

    /// Forwards a cancel to the backend linked to `key`, or, for a key another instance
    /// minted, to that instance; true if one was sent.
    pub async fn cancel(&self, pid: u32, secret: u32) -> bool {
        let owner = peer_of(pid);
        if self.peer_id != 0 && owner != self.peer_id {
            return match self.peers.get(&owner) {
                Some(peer) => forward(peer, pid, secret).await.is_ok(),
                None => false,
            };
        }
        let entry = self.entries.get(&pid).map(|e| e.clone());
        let target = match entry {
            Some(e) if bool::from(e.secret.to_be_bytes().ct_eq(&secret.to_be_bytes())) => {
                // Read after `linked`: a link stores its target first (Release pairs with this).
                if e.linked.load(std::sync::atomic::Ordering::Acquire) {
                    e.target.lock().ok().and_then(|t| t.clone())
                } else {
                    None
                }
            }
            _ => None,
        };
        match target {
            Some(t) => t.send().await.is_ok(),
            None => false,
        }
    }

    pub fn peer_id(&self) -> u16 {
        self.peer_id
    }

    /// Ends every session of `tenant`: each one's client socket stops reading, so the session
    /// finds its client gone at once, rolls back whatever transaction was open, and tells the
    /// client `reason`. Returns how many sessions were told.
    pub fn terminate_tenant(&self, tenant: &str, reason: &str) -> usize {
        let targets: Vec<Arc<Entry>> = self
            .entries
            .iter()
            .filter(|e| &*e.tenant == tenant)
            .map(|e| e.value().clone())
            .collect();
        let mut n = 0;
        for e in targets {
            if let Ok(mut c) = e.control.lock() {
                c.terminated = Some(reason.into());
                if c.socket >= 0 {
                    // SAFETY: the descriptor is open: the session clears it (under this lock)
                    // before closing its socket.
                    unsafe {
                        libc::shutdown(c.socket, libc::SHUT_RD);
                    }
                    n += 1;
                }
            }
        }
        n
    }

    /// Tells every session to end as soon as its client is between transactions.
    pub fn begin_drain(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Release);
        self.drain.notify_waiters();
        for e in self.entries.iter() {
            e.drain_waker.wake();
        }
    }

    /// Ends every session, as `terminate_tenant` does for one tenant's.
    pub fn terminate_all(&self, reason: &str) -> usize {
        let tenants: std::collections::BTreeSet<Arc<str>> =
            self.entries.iter().map(|e| e.tenant.clone()).collect();
        tenants
            .iter()
            .map(|t| self.terminate_tenant(t, reason))
            .sum()
    }

    /// Every client now, by key.
    pub fn clients(&self) -> Vec<ClientView> {
        let mut v: Vec<ClientView> = self
            .entries
            .iter()
            .map(|e| ClientView {
                pid: *e.key(),
                tenant: e.tenant.clone(),
                info: e.info.clone(),
                linked: e.linked.load(std::sync::atomic::Ordering::Acquire),
            })
            .collect();
        v.sort_by_key(|c| c.pid);
        v
    }

    /// Clients of `tenant` now.
    pub fn count(&self, tenant: &str) -> usize {
        self.entries.iter().filter(|e| &*e.tenant == tenant).count()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Sends a CancelRequest to another instance; it checks the key as its own. Unencrypted, like
/// every CancelRequest, and bounded in time.
async fn forward(peer: &Peer, pid: u32, secret: u32) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let send = async {
        let mut s = tokio::net::TcpStream::connect((peer.host.as_str(), peer.port)).await?;
        let mut pkt = [0u8; 16];
        pkt[..8].copy_from_slice(&[0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e]);
        pkt[8..12].copy_from_slice(&pid.to_be_bytes());
        pkt[12..].copy_from_slice(&secret.to_be_bytes());
        s.write_all(&pkt).await?;
        // The peer closes once it has acted on it.
        let mut sink = [0u8; 1];
        let _ = s.read(&mut sink).await;
        Ok(())
    };
    tokio::time::timeout(std::time::Duration::from_secs(5), send)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

pub struct CancelGuard {
    registry: Arc<CancelRegistry>,
    entry: Arc<Entry>,
    /// The key's process id: minted, or the server process's own (`adopt_server_pid`).
    pid: std::sync::atomic::AtomicU32,
    secret: u32,
    /// The address of the target in `entry.target`, written only by this guard's session:
    /// whether a link changes it is known without the lock. The slot keeps that target alive,
    /// so no other target can have its address meanwhile.
    target_addr: std::sync::atomic::AtomicUsize,
    /// The waker `entry.drain_waker` holds (its data and vtable addresses), written only by
    /// this guard's session: an idle wait polled again by the same task registers nothing,
    /// where registering takes two atomic read-modify-writes per transaction. The registered
    /// waker keeps its task alive, so no other task has these addresses meanwhile.
    drain_registered: [std::sync::atomic::AtomicUsize; 2],
}

impl CancelGuard {
    pub fn key(&self) -> CancelKey {
        CancelKey {
            pid: self.pid.load(std::sync::atomic::Ordering::Relaxed),
            secret: self.secret,
        }
    }

    /// Session mode: the client's key takes its server process's real id, so
    /// `pg_backend_pid()`, notification pids and `pg_terminate_backend` agree with what the
    /// client was told, as on a direct connection; the secret stays pgtenant's own, so a
    /// cancel still goes through pgtenant's check. Keeps the minted id (and says false) when
    /// this instance has peers (their keys carry the instance) or another client already holds
    /// that id (the same pid on another server).
    pub fn adopt_server_pid(&self, server_pid: u32) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let old = self.pid.load(Relaxed);
        if self.registry.peer_id != 0 || server_pid == 0 || server_pid == old {
            return server_pid == old;
        }
        match self.registry.entries.entry(server_pid) {
            dashmap::Entry::Occupied(_) => false,
            dashmap::Entry::Vacant(v) => {
                v.insert(self.entry.clone());
                self.pid.store(server_pid, Relaxed);
                self.registry.entries.remove(&old);
                true
            }
        }
    }

    pub fn link(&self, target: &Arc<CancelTarget>) {
        use std::sync::atomic::Ordering::{Relaxed, Release};
        let addr = Arc::as_ptr(target) as usize;
        if self.target_addr.load(Relaxed) != addr {
            if let Ok(mut t) = self.entry.target.lock() {
                *t = Some(target.clone());
                self.target_addr.store(addr, Relaxed);
            }
        }
        self.entry.linked.store(true, Release);
    }

    pub fn unlink(&self) {
        self.entry
            .linked
            .store(false, std::sync::atomic::Ordering::Release);
    }

    /// Call before the client socket is closed.
    pub fn detach_socket(&self) {
        if let Ok(mut c) = self.entry.control.lock() {
            c.socket = -1;
        }
    }

    /// pgtenant is shutting down.
    pub fn is_draining(&self) -> bool {
        self.registry
            .draining
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// True once pgtenant is shutting down; until then `waker` is woken when it starts to.
    pub fn drain_wakes(&self, waker: &std::task::Waker) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        if self.is_draining() {
            return true;
        }
        // Only a drain takes the waker out of `drain_waker`, and then the check above answers.
        let id = [waker.data() as usize, waker.vtable() as *const _ as usize];
        if self.drain_registered[0].load(Relaxed) == id[0]
            && self.drain_registered[1].load(Relaxed) == id[1]
        {
            return false;
        }
        self.entry.drain_waker.register(waker);
        self.drain_registered[0].store(id[0], Relaxed);
        self.drain_registered[1].store(id[1], Relaxed);
        // Checked again: a drain that began before the registration woke nobody.
        self.is_draining()
    }

    /// Resolves once pgtenant starts shutting down.
    pub async fn drained(&self) {
        let n = self.registry.drain.notified();
        tokio::pin!(n);
        n.as_mut().enable();
        if self.is_draining() {
            return;
        }
        n.await;
    }

    /// Why an operator ended this session, if one did.
    pub fn termination(&self) -> Option<String> {
        self.entry
            .control
            .lock()
            .ok()
            .and_then(|c| c.terminated.as_deref().map(str::to_string))
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.detach_socket();
        let entry = &self.entry;
        self.registry
            .entries
            .remove_if(&self.key().pid, |_, e| Arc::ptr_eq(e, entry));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_takes_the_server_pid_unless_another_client_holds_it() {
        let reg = Arc::new(CancelRegistry::default());
        let a = reg.register("t", -1);
        let b = reg.register("t", -1);
        assert!(a.adopt_server_pid(4242));
        assert_eq!(a.key().pid, 4242);
        let minted = b.key().pid;
        assert!(!b.adopt_server_pid(4242), "another client holds 4242");
        assert_eq!(b.key().pid, minted);
        assert_eq!(reg.len(), 2);
        drop(a);
        assert_eq!(reg.len(), 1);
    }

    #[test]
    fn an_instance_with_peers_keeps_its_minted_keys() {
        let reg = Arc::new(CancelRegistry::with_peers(3, Default::default()));
        let a = reg.register("t", -1);
        assert!(!a.adopt_server_pid(4242));
        assert_eq!(peer_of(a.key().pid), 3);
    }

    #[tokio::test]
    async fn a_wrong_secret_cancels_nothing() {
        let reg = Arc::new(CancelRegistry::default());
        let g = reg.register("t", -1);
        // Linked to a port nothing listens on: a forwarded cancel would report failure, but a
        // wrong secret must not even try.
        g.link(&Arc::new(CancelTarget {
            host: "127.0.0.1".into(),
            port: 1,
            pid: 1,
            secret: 1,
        }));
        assert!(
            !reg.cancel(g.key().pid, g.key().secret.wrapping_add(1))
                .await
        );
    }

    #[tokio::test]
    async fn an_unlinked_client_cancels_nothing() {
        let reg = Arc::new(CancelRegistry::default());
        let g = reg.register("t", -1);
        assert!(!reg.cancel(g.key().pid, g.key().secret).await);
    }

    fn target(port: u16) -> Arc<CancelTarget> {
        Arc::new(CancelTarget {
            host: "127.0.0.1".into(),
            port,
            pid: 1,
            secret: 1,
        })
    }

    /// The target a cancel would go to now, as `cancel` finds it.
    fn current(reg: &CancelRegistry, g: &CancelGuard) -> Option<u16> {
        let e = reg.entries.get(&g.key().pid)?;
        if !e.linked.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        let port = e.target.lock().ok()?.as_ref().map(|t| t.port);
        port
    }

    #[tokio::test]
    async fn a_drain_wakes_a_session_whose_later_waits_registered_nothing() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let reg = Arc::new(CancelRegistry::default());
        let g = Arc::new(reg.register("t", -1));
        let polls = Arc::new(AtomicUsize::new(0));
        let waker = Arc::new(std::sync::Mutex::new(None::<std::task::Waker>));
        let waiting = {
            let (g, polls, waker) = (g.clone(), polls.clone(), waker.clone());
            tokio::spawn(std::future::poll_fn(move |cx| {
                polls.fetch_add(1, SeqCst);
                *waker.lock().expect("lock") = Some(cx.waker().clone());
                if g.drain_wakes(cx.waker()) {
                    std::task::Poll::Ready(())
                } else {
                    std::task::Poll::Pending
                }
            }))
        };
        let wait_for = |n: usize| {
            let polls = polls.clone();
            async move {
                while polls.load(SeqCst) < n {
                    tokio::task::yield_now().await;
                }
            }
        };
        wait_for(1).await;
        // Woken by something else (its client's socket, say): the second wait registers nothing.
        let w = waker.lock().expect("lock").take().expect("waker");
        w.wake();
        wait_for(2).await;
        reg.begin_drain();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken by the drain")
            .expect("task");
        assert_eq!(polls.load(SeqCst), 3);
    }

    #[test]
    fn a_client_unlinked_after_its_transaction_has_no_target() {
        let reg = Arc::new(CancelRegistry::default());
        let g = reg.register("t", -1);
        let a = target(1);
        g.link(&a);
        assert_eq!(current(&reg, &g), Some(1));
        g.unlink();
        assert_eq!(current(&reg, &g), None);
        assert!(!reg.clients()[0].linked);
    }

    #[test]
    fn relinking_to_another_backend_moves_the_target() {
        let reg = Arc::new(CancelRegistry::default());
        let g = reg.register("t", -1);
        let (a, b) = (target(1), target(2));
        g.link(&a);
        g.unlink();
        g.link(&b);
        assert_eq!(current(&reg, &g), Some(2));
        g.unlink();
        g.link(&a);
        assert_eq!(current(&reg, &g), Some(1));
        assert!(reg.clients()[0].linked);
    }

    #[test]
    fn keys_of_an_instance_with_peers_carry_its_peer_id() {
        let reg = Arc::new(CancelRegistry::with_peers(1234, Default::default()));
        for _ in 0..100 {
            let g = reg.register("t", -1);
            assert_eq!(peer_of(g.key().pid), 1234);
            assert!(g.key().pid <= i32::MAX as u32, "a positive process id");
        }
    }

    #[tokio::test]
    async fn a_key_of_an_unknown_peer_cancels_nothing() {
        let reg = Arc::new(CancelRegistry::with_peers(1, Default::default()));
        assert!(!reg.cancel(2 << LOCAL_BITS | 5, 7).await);
    }

    #[test]
    fn keys_are_removed_with_their_client() {
        let reg = Arc::new(CancelRegistry::default());
        let g = reg.register("t", -1);
        assert_eq!(reg.len(), 1);
        drop(g);
        assert!(reg.is_empty());
    }
}
