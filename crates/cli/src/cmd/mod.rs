pub mod agent;
pub mod allocations;
pub mod gc;
pub mod kkp;
pub mod migrate;
pub mod namespace;
pub mod node;
#[cfg(any(feature = "etcd", feature = "kubernetes"))]
pub mod operator;
pub mod pool;
pub mod status;
#[cfg(feature = "webhook")]
pub mod webhook;
