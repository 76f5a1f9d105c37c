//! kubectl-like output: a table by default, or the objects as JSON or YAML.

use std::io::Write;

use clap::ValueEnum;
use serde::Serialize;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Format {
    #[default]
    Table,
    Json,
    Yaml,
}

/// Prints `value` as JSON or YAML, or calls `table` for the table form. A closed stdout (the
/// reader went away, as with `| head`) comes back as an io error, not a panic.
pub fn print<T: Serialize>(format: Format, value: &T, table: impl FnOnce() -> Table) -> anyhow::Result<()> {
    let text = render(format, value, table)?;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

/// What `print` writes.
pub fn render<T: Serialize>(format: Format, value: &T, table: impl FnOnce() -> Table) -> anyhow::Result<String> {
    Ok(match format {
        Format::Json => serde_json::to_string_pretty(value)? + "\n",
        Format::Yaml => serde_saphyr::to_string(value)?,
        Format::Table => table().render(),
    })
}

/// True when `e` comes from writing to a pipe whose reader is gone.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

/// Columns separated by at least three spaces, headers in capitals, like kubectl.
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Self {
        Table { headers: headers.iter().map(|h| h.to_uppercase()).collect(), rows: Vec::new() }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        if self.rows.is_empty() {
            return "No resources found.\n".into();
        }
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            let last = row.len().saturating_sub(1);
            for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
                out.push_str(cell);
                if i < last {
                    out.push_str(&" ".repeat(w - cell.chars().count() + 3));
                }
            }
            out.push('\n');
        }
        out
    }
}

/// `[#######.............]  35%`
pub fn usage_bar(used: u128, total: u128, width: usize) -> String {
    let ratio = if total == 0 { 0.0 } else { used as f64 / total as f64 };
    let filled = ((ratio * width as f64).round() as usize).min(width);
    format!("[{}{}] {:>3.0}%", "#".repeat(filled), ".".repeat(width - filled), ratio * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let mut t = Table::new(&["name", "cidrs"]);
        t.row(vec!["default".into(), "10.0.0.0/16".into()]);
        t.row(vec!["a".into(), "fd00::/104".into()]);
        assert_eq!(t.render(), "NAME      CIDRS\ndefault   10.0.0.0/16\na         fd00::/104\n");
        assert_eq!(Table::new(&["x"]).render(), "No resources found.\n");
    }

    #[test]
    fn bar_rounds_and_clamps() {
        assert_eq!(usage_bar(0, 0, 4), "[....]   0%");
        assert_eq!(usage_bar(1, 2, 4), "[##..]  50%");
        assert_eq!(usage_bar(5, 4, 4), "[####] 125%");
    }
}
