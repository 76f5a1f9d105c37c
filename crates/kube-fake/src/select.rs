//! Label and field selectors, parsed from the query string the way the apiserver reads them.

use serde_json::Value;

#[derive(Clone, Debug, PartialEq)]
enum LabelTerm {
    Eq(String, String),
    NotEq(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`, joined by commas.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LabelSelector(Vec<LabelTerm>);

/// Split on commas outside parentheses.
fn split_terms(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out.into_iter().map(str::trim).filter(|t| !t.is_empty()).collect()
}

fn valid_key(k: &str) -> bool {
    !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

fn set_values(rest: &str, term: &str) -> Result<Vec<String>, String> {
    let rest = rest.trim();
    let inner = rest.strip_prefix('(').and_then(|r| r.strip_suffix(')')).ok_or_else(|| {
        format!("unable to parse requirement {term:?}: the values of in/notin go in parentheses, e.g. `k in (a,b)`")
    })?;
    Ok(inner.split(',').map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).collect())
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in split_terms(s) {
            let t = if let Some(k) = term.strip_prefix('!') {
                LabelTerm::NotExists(k.trim().to_string())
            } else if let Some((k, v)) = term.split_once("!=") {
                LabelTerm::NotEq(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                LabelTerm::Eq(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, rest)) = term.split_once(" notin ") {
                LabelTerm::NotIn(k.trim().to_string(), set_values(rest, term)?)
            } else if let Some((k, rest)) = term.split_once(" in ") {
                LabelTerm::In(k.trim().to_string(), set_values(rest, term)?)
            } else {
                LabelTerm::Exists(term.to_string())
            };
            let key = match &t {
                LabelTerm::Eq(k, _) | LabelTerm::NotEq(k, _) | LabelTerm::Exists(k) | LabelTerm::NotExists(k) => k,
                LabelTerm::In(k, _) | LabelTerm::NotIn(k, _) => k,
            };
            if !valid_key(key) {
                return Err(format!(
                    "unable to parse requirement {term:?}: label selectors are `k=v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`"
                ));
            }
            terms.push(t);
        }
        Ok(Self(terms))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|t| match t {
            LabelTerm::Eq(k, v) => get(k) == Some(v.as_str()),
            LabelTerm::NotEq(k, v) => get(k) != Some(v.as_str()),
            LabelTerm::Exists(k) => get(k).is_some(),
            LabelTerm::NotExists(k) => get(k).is_none(),
            LabelTerm::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelTerm::NotIn(k, vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
        })
    }
}

/// `path=v`, `path==v`, `path!=v` on any dotted path (`metadata.name`, `spec.nodeName`,
/// `status.phase`); a missing field reads as "". The real apiserver accepts only a few fields per
/// kind; this fake accepts every path.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

pub fn field_value(obj: &Value, path: &str) -> String {
    let mut cur = obj;
    for part in path.split('.') {
        match cur.get(part) {
            Some(v) => cur = v,
            None => return String::new(),
        }
    }
    match cur {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

impl FieldSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in split_terms(s) {
            let (k, eq, v) = if let Some((k, v)) = term.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (k, true, v)
            } else {
                return Err(format!(
                    "invalid field selector {term:?}: use `path=value` or `path!=value`, e.g. `spec.nodeName=n1`"
                ));
            };
            let k = k.trim();
            if !valid_key(k) {
                return Err(format!(
                    "invalid field selector {term:?}: the field must be a dotted path such as `metadata.name`"
                ));
            }
            terms.push((k.to_string(), eq, v.trim().to_string()));
        }
        Ok(Self(terms))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(k, eq, v)| (field_value(obj, k) == *v) == *eq)
    }

    /// The name a `metadata.name=x` term pins (kube's `watch_object` uses it).
    pub fn name(&self) -> Option<&str> {
        self.0.iter().find(|(k, eq, _)| k == "metadata.name" && *eq).map(|(_, _, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_terms_match_like_the_apiserver() {
        let o = json!({"metadata": {"labels": {"a": "1", "b": "x"}}});
        let cases = [
            ("a=1", true),
            ("a==1", true),
            ("a=2", false),
            ("a!=2", true),
            ("c!=2", true),
            ("a", true),
            ("c", false),
            ("!c", true),
            ("!a", false),
            ("b in (x, y)", true),
            ("b in (y)", false),
            ("b notin (y)", true),
            ("c notin (y)", true),
            ("b notin (x)", false),
            ("a=1,b in (x)", true),
            ("a=1,b=y", false),
            ("", true),
        ];
        for (sel, want) in cases {
            assert_eq!(LabelSelector::parse(sel).unwrap().matches(&o), want, "{sel}");
        }
        assert!(LabelSelector::parse("a in x").is_err());
        assert!(LabelSelector::parse("a b").is_err());
    }

    #[test]
    fn field_terms_read_dotted_paths() {
        let o = json!({"metadata": {"name": "p", "namespace": "d"}, "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}});
        let cases = [
            ("metadata.name=p", true),
            ("spec.nodeName=n1", true),
            ("spec.nodeName=n2", false),
            ("status.phase!=Succeeded", true),
            ("spec.missing=", true),
            ("spec.nodeName==n1,metadata.namespace=d", true),
        ];
        for (sel, want) in cases {
            assert_eq!(FieldSelector::parse(sel).unwrap().matches(&o), want, "{sel}");
        }
        assert_eq!(FieldSelector::parse("metadata.name=p").unwrap().name(), Some("p"));
        assert!(FieldSelector::parse("spec.nodeName").is_err());
    }
}
