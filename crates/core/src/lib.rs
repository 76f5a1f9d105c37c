//! allot's domain logic: CIDR math, pools and their validation, the operator's block allocator,
//! the node's address allocator, demand, and pool selection. No I/O, no async, no wire formats.

pub mod blocks;
pub mod cidr;
pub mod demand;
pub mod node_alloc;
pub mod pool;
pub mod select;

pub use cidr::Family;
pub use pool::{ApplyAction, BlockGrant, FamilySpec, Pool, PoolError, PoolSpec};
