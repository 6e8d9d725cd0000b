//! Reading the PromQL expressions of the dashboard and the alerting rules outpost ships.

/// The `outpost_…` names in an expression.
pub fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find("outpost_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// The labels of every `by (a, b)` and `on (a, b)` in an expression.
pub fn grouping_labels(expr: &str) -> Vec<String> {
    ["by (", "on ("]
        .into_iter()
        .flat_map(|clause| expr.split(clause).skip(1))
        .flat_map(|tail| {
            tail[..tail.find(')').unwrap()]
                .split(',')
                .map(|l| l.trim().to_owned())
                .collect::<Vec<_>>()
        })
        .collect()
}
