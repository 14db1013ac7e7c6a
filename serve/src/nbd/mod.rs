//! The NBD transport: [`proto`] parses what clients send; the server turns it into batches on
//! an export's stack.

pub mod proto;
pub mod server;
pub mod tls;

pub use server::{Listener, NbdConfig, NbdServer};
pub use tls::TlsCreds;
