//! Who is connected: each client's cancel key and registration (SHOW CLIENTS, operator
//! termination, cancel forwarding between instances), and the limits on clients and on logins
//! still pending; and the client's socket (plain or TLS). Shared by the front end, the admin
//! console and the proxy, below all three.

pub mod cancel;
pub mod limits;
pub mod stream;
