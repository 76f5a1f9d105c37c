//! CNI migration, automated: `plan` reads the cluster (live or from a `kubectl get -o yaml` dump)
//! and says what would happen to every pod; `orchestrate` carries a plan out as a pure state
//! machine over the `Cluster` trait, so every step can be crashed and resumed in tests.

pub mod detect;
pub mod kkp;
pub mod plan;
pub mod kube_cluster;
pub mod orchestrate;
pub mod sim;
pub mod snapshot;
