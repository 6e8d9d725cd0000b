//! What a mapping keeps of a profile and how its payload nests, worked out once per mapping
//! for the record engine ([`super::engine`]).
//!
//! Attribute paths are reduced to *leaves*: a mapped path under another mapped path is part
//! of the shorter one's value, so only the shorter one is kept and compared. Comparing the
//! leaves is comparing every mapped path: a value under a leaf differs only if the leaf's
//! value differs.

use crate::config::Mapping;

/// One kept attribute path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    pub keys: Vec<String>,
    /// The keys joined with `.`: the attribute's name in a stored record.
    pub joined: String,
}

/// A node of the payload's attribute part: an object key, and either a leaf or children.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Node {
    pub key: String,
    /// The key as JSON text (quoted, escaped).
    pub key_json: String,
    pub leaf: Option<usize>,
    /// Sorted by key, as serde_json orders an object's keys.
    pub children: Vec<Node>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Sorted by `joined`, the order of a record's attributes.
    pub leaves: Vec<Leaf>,
    /// The top level of the payload's attribute part, sorted by key.
    pub(crate) roots: Vec<Node>,
    /// The mapped segments, sorted and without repeats (the payload's order).
    pub segments: Vec<String>,
    /// `None`: every namespace is kept; else these, sorted.
    pub namespaces: Option<Vec<String>>,
}

impl Layout {
    pub fn new(mapping: &Mapping) -> Layout {
        let mut paths: Vec<&Vec<String>> = mapping.attributes.iter().collect();
        paths.sort();
        paths.dedup();
        // After sorting, a path's proper prefixes come before it.
        let mut kept: Vec<&Vec<String>> = Vec::new();
        for path in paths {
            if !kept.iter().any(|k| path.starts_with(k)) {
                kept.push(path);
            }
        }
        let mut leaves: Vec<Leaf> = kept
            .into_iter()
            .map(|keys| Leaf {
                joined: keys.join("."),
                keys: keys.clone(),
            })
            .collect();
        leaves.sort_by(|a, b| a.joined.cmp(&b.joined));
        let mut roots = Vec::new();
        for (index, leaf) in leaves.iter().enumerate() {
            insert_node(&mut roots, &leaf.keys, index);
        }
        sort_nodes(&mut roots);
        let mut segments = mapping.segments.clone();
        segments.sort();
        segments.dedup();
        let namespaces = (!mapping.identities.is_empty()).then(|| {
            let mut namespaces = mapping.identities.clone();
            namespaces.sort();
            namespaces.dedup();
            namespaces
        });
        Layout {
            leaves,
            roots,
            segments,
            namespaces,
        }
    }

    pub fn keeps_namespace(&self, namespace: &str) -> bool {
        self.namespaces
            .as_ref()
            .is_none_or(|kept| kept.binary_search_by(|k| k.as_str().cmp(namespace)).is_ok())
    }

    pub fn maps_segment(&self, segment: &str) -> bool {
        self.segments
            .binary_search_by(|s| s.as_str().cmp(segment))
            .is_ok()
    }
}

pub(crate) fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    push_json_string(&mut out, text);
    out
}

/// Appends `text` as a JSON string, escaped as serde_json escapes it.
pub(crate) fn push_json_string(out: &mut String, text: &str) {
    let plain = text.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\');
    if plain {
        out.push('"');
        out.push_str(text);
        out.push('"');
    } else {
        out.push_str(&serde_json::to_string(text).expect("a string serializes"));
    }
}

fn insert_node(nodes: &mut Vec<Node>, keys: &[String], leaf: usize) {
    let (first, rest) = keys.split_first().expect("mapping paths are never empty");
    let position = match nodes.iter().position(|n| &n.key == first) {
        Some(i) => i,
        None => {
            nodes.push(Node {
                key: first.clone(),
                key_json: json_string(first),
                leaf: None,
                children: Vec::new(),
            });
            nodes.len() - 1
        }
    };
    let node = &mut nodes[position];
    if rest.is_empty() {
        node.leaf = Some(leaf);
    } else {
        insert_node(&mut node.children, rest, leaf);
    }
}

fn sort_nodes(nodes: &mut [Node]) {
    nodes.sort_by(|a, b| a.key.cmp(&b.key));
    for node in nodes {
        sort_nodes(&mut node.children);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_as_serde_json_does() {
        for text in [
            "plain",
            "quote \" back \\ slash",
            "tab\t",
            "\u{1}",
            "é 日本",
        ] {
            assert_eq!(json_string(text), serde_json::to_string(text).unwrap());
        }
    }

    #[test]
    fn paths_under_a_mapped_path_are_part_of_its_leaf() {
        let mapping = Mapping::new(
            &[
                "person.name.firstName",
                "person.name",
                "a.b",
                "a-b",
                "mobilePhone",
            ],
            &["s2", "s1", "s2"],
            &["ECID", "Email"],
        );
        let layout = Layout::new(&mapping);
        let joined: Vec<&str> = layout.leaves.iter().map(|l| l.joined.as_str()).collect();
        assert_eq!(joined, ["a-b", "a.b", "mobilePhone", "person.name"]);
        let roots: Vec<&str> = layout.roots.iter().map(|n| n.key.as_str()).collect();
        assert_eq!(roots, ["a", "a-b", "mobilePhone", "person"]);
        assert_eq!(layout.roots[3].children[0].leaf, Some(3));
        assert_eq!(layout.segments, ["s1", "s2"]);
        assert!(layout.keeps_namespace("Email") && !layout.keeps_namespace("email"));
        assert!(Layout::new(&Mapping::new(&[], &[], &[])).keeps_namespace("any"));
    }
}
