pub mod agent;
pub mod allocations;
pub mod gc;
pub mod namespace;
pub mod node;
pub mod pool;
pub mod status;
