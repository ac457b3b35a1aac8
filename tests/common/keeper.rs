//! The long-lived thread a test binary's fixture lives on. Throwaway clusters die with the
//! thread that started them (PR_SET_PDEATHSIG), and a proxy must outlive every test's own
//! runtime, so both are made here, on a thread that lives until the process exits, in a
//! runtime that keeps running there. Clusters handed to `keep` are stopped at exit.

use std::future::Future;
use std::sync::Mutex;

use pgtenant::cluster::PgCluster;

/// Statics are never dropped: the exit hook stops these.
static CLUSTERS: Mutex<Vec<PgCluster>> = Mutex::new(Vec::new());

extern "C" fn stop_clusters() {
    if let Ok(mut c) = CLUSTERS.lock() {
        c.clear();
    }
}

/// Runs `build` on the keeper thread and returns what it made, with the keeper's runtime.
pub fn on_keeper_thread<T, F, Fut>(build: F) -> (T, tokio::runtime::Handle)
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("fixture".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("fixture runtime");
            unsafe {
                libc::atexit(stop_clusters);
            }
            let made = rt.block_on(build());
            tx.send((made, rt.handle().clone())).expect("send fixture");
            rt.block_on(std::future::pending::<()>());
        })
        .expect("fixture thread");
    rx.recv().expect("fixture failed to start")
}

/// Stops `cluster` when the process exits.
pub fn keep(cluster: PgCluster) {
    CLUSTERS.lock().expect("clusters").push(cluster);
}
