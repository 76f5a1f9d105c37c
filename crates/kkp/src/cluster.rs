//! The parts of a Kubermatic `kubermatic.k8c.io/v1` `Cluster` that the rules read. Every other
//! field is ignored, so a full object from `kubectl get cluster NAME -o yaml` parses.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

pub const API_VERSION: &str = "kubermatic.k8c.io/v1";
pub const KIND: &str = "Cluster";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cluster {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default, deserialize_with = "null_default")]
    pub metadata: Metadata,
    #[serde(default, deserialize_with = "null_default")]
    pub spec: ClusterSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    #[serde(default, skip_serializing_if = "String::is_empty", deserialize_with = "null_default")]
    pub name: String,
    #[serde(default, deserialize_with = "null_default")]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni_plugin: Option<CniPlugin>,
    #[serde(default, deserialize_with = "null_default")]
    pub cluster_network: ClusterNetwork,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CniPlugin {
    #[serde(default, rename = "type", deserialize_with = "null_default")]
    pub kind: String,
    #[serde(default, deserialize_with = "null_default")]
    pub version: String,
}

/// `spec.clusterNetwork`. Konnectivity lives here too (`konnectivityEnabled`, deprecated in
/// newer KKP releases but still read by their validation).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterNetwork {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_family: Option<String>,
    #[serde(default, deserialize_with = "null_default")]
    pub pods: NetworkRanges,
    #[serde(default, deserialize_with = "null_default")]
    pub services: NetworkRanges,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_domain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_mode: Option<String>,
    #[serde(default, rename = "nodeLocalDNSCacheEnabled", skip_serializing_if = "Option::is_none")]
    pub node_local_dns_cache_enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub konnectivity_enabled: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkRanges {
    #[serde(default, deserialize_with = "null_default")]
    pub cidr_blocks: Vec<String>,
}

/// `null` (as `kubectl` prints for empty fields) reads as the default.
fn null_default<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(d: D) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("not a Kubermatic Cluster: {0}")]
    Syntax(String),
    #[error(
        "expected apiVersion {API_VERSION} and kind {KIND}, found apiVersion {api_version:?} and kind {kind:?}: \
         give one Cluster object, as `kubectl get cluster NAME -o yaml` prints it"
    )]
    WrongKind { api_version: String, kind: String },
}

impl Cluster {
    /// One Cluster object as YAML or JSON (JSON is YAML too).
    pub fn from_yaml(text: &str) -> Result<Cluster, ParseError> {
        let c: Cluster = serde_saphyr::from_str(text).map_err(|e| ParseError::Syntax(e.to_string()))?;
        c.checked()
    }

    /// One Cluster object as a JSON value (an AdmissionReview's `object`).
    pub fn from_value(value: serde_json::Value) -> Result<Cluster, ParseError> {
        let c: Cluster = serde_json::from_value(value).map_err(|e| ParseError::Syntax(e.to_string()))?;
        c.checked()
    }

    fn checked(self) -> Result<Cluster, ParseError> {
        if self.api_version != API_VERSION || self.kind != KIND {
            return Err(ParseError::WrongKind { api_version: self.api_version, kind: self.kind });
        }
        Ok(self)
    }

    pub fn has_label(&self, key: &str) -> bool {
        self.metadata.labels.contains_key(key)
    }
}
