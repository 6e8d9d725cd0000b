//! The terminal layout of `outpost top`: a pure function of a [`View`], drawn into any ratatui
//! backend (crossterm on a terminal, `TestBackend` in tests). Two arrangements: four counter
//! columns from 100 columns and 30 rows up, three otherwise (retries move beside delivery).

use ratatui::backend::TestBackend;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph, Sparkline};
use ratatui::{Frame, Terminal};

use super::view::{destination, duration, latency, per_second, rate_cap, Figure, View};

/// How many snapshots of history the sparklines can show (ten minutes at one a second).
pub const HISTORY_POINTS: usize = 600;

/// Draws `view` over the whole frame.
pub fn draw(frame: &mut Frame, view: &View) {
    let area = frame.area();
    let wide = area.width >= 100 && area.height >= 30;
    let [title, body] = Layout::vertical([Constraint::Length(1), Constraint::Min(0)]).areas(area);
    frame.render_widget(Paragraph::new(title_line(view)), title);
    if wide {
        let [counters, state, trends] = Layout::vertical([
            Constraint::Length(9),
            Constraint::Length(8),
            Constraint::Min(4),
        ])
        .areas(body);
        let columns = Layout::horizontal([Constraint::Ratio(1, 4); 4]).split(counters);
        figures(frame, columns[0], "Updates/s", &view.updates);
        figures(frame, columns[1], "Exports/s", &view.exports);
        figures(frame, columns[2], "Deliveries/s", &view.deliveries);
        figures(frame, columns[3], "Retries/s", &view.retries);
        let [left, right] =
            Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)])
                .areas(state);
        delivery(frame, left, view);
        outbox(frame, right, view, Row::Inner);
        let [pending, waited] =
            Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)])
                .areas(trends);
        sparkline(
            frame,
            pending,
            "Outbox pending",
            &view.pending_history,
            Some(view.interval_s),
            Row::Inner,
        );
        sparkline(
            frame,
            waited,
            "Oldest waited (s)",
            &view.waited_history,
            Some(view.interval_s),
            Row::Inner,
        );
    } else {
        let [counters, state, trends] = Layout::vertical([
            Constraint::Length(7),
            Constraint::Length(9),
            Constraint::Min(3),
        ])
        .areas(body);
        let columns = Layout::horizontal([Constraint::Ratio(1, 3); 3]).split(counters);
        figures(frame, columns[0], "Updates/s", &view.updates);
        figures(frame, columns[1], "Exports/s", &view.exports);
        figures(frame, columns[2], "Deliveries/s", &view.deliveries);
        let [left, right] =
            Layout::horizontal([Constraint::Percentage(60), Constraint::Percentage(40)])
                .areas(state);
        delivery(frame, left, view);
        figures(frame, right, "Retries/s", &view.retries);
        let [text, pending, waited] = Layout::horizontal([
            Constraint::Percentage(40),
            Constraint::Percentage(30),
            Constraint::Percentage(30),
        ])
        .areas(trends);
        outbox(frame, text, view, Row::Bottom);
        sparkline(
            frame,
            pending,
            "Pending",
            &view.pending_history,
            None,
            Row::Bottom,
        );
        sparkline(
            frame,
            waited,
            "Oldest (s)",
            &view.waited_history,
            None,
            Row::Bottom,
        );
    }
}

/// `view` drawn on a `width` × `height` screen, as text (one line a row, trailing spaces cut).
pub fn render_text(view: &View, width: u16, height: u16) -> String {
    let mut terminal =
        Terminal::new(TestBackend::new(width, height)).expect("a test backend always starts");
    terminal
        .draw(|frame| draw(frame, view))
        .expect("drawing into memory cannot fail");
    let buffer = terminal.backend().buffer();
    let mut text = String::new();
    for y in 0..buffer.area.height {
        let mut line = String::new();
        for x in 0..buffer.area.width {
            line.push_str(buffer[(x, y)].symbol());
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

fn title_line(view: &View) -> Line<'static> {
    let mut spans = vec![
        Span::styled("outpost top", Style::new().add_modifier(Modifier::BOLD)),
        Span::raw(format!(
            "  {}  run time {}  every {:.1} s  q quits",
            view.store,
            duration(view.run_time_s),
            view.interval_s
        )),
    ];
    if let Some(notice) = &view.notice {
        spans.insert(
            1,
            Span::styled(
                format!("  {notice}"),
                Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
            ),
        );
    }
    Line::from(spans)
}

fn block(title: &str) -> Block<'static> {
    Block::bordered().title(Span::styled(
        format!(" {title} "),
        Style::new().add_modifier(Modifier::BOLD),
    ))
}

/// Where the blocks go: on a small screen the bottom row's blocks have no bottom border, which
/// leaves the outbox a line for the stream's lag.
#[derive(Clone, Copy)]
enum Row {
    Inner,
    Bottom,
}

fn block_in(title: &str, row: Row) -> Block<'static> {
    match row {
        Row::Inner => block(title),
        Row::Bottom => block(title).borders(Borders::TOP | Borders::LEFT | Borders::RIGHT),
    }
}

/// A family's figures: label, per second, and the total when the column is wide enough.
fn figures(frame: &mut Frame, area: Rect, title: &str, figures: &[Figure]) {
    let inner = area.width.saturating_sub(2) as usize;
    let label_width = figures.iter().map(|f| f.label.len()).max().unwrap_or(0);
    let with_total = inner >= label_width + 1 + 6 + 1 + 7;
    let lines: Vec<Line> = figures
        .iter()
        .map(|f| {
            let style = if f.per_s > 0.0 {
                Style::new().add_modifier(Modifier::BOLD)
            } else {
                Style::new().fg(Color::DarkGray)
            };
            let mut text = format!("{:<label_width$} {:>6}", f.label, per_second(f.per_s));
            if with_total {
                text.push_str(&format!(" {:>7}", f.total));
            }
            Line::styled(text, style)
        })
        .collect();
    let title = if with_total {
        format!("{title} (total)")
    } else {
        title.to_owned()
    };
    frame.render_widget(Paragraph::new(lines).block(block(&title)), area);
}

fn delivery(frame: &mut Frame, area: Rect, view: &View) {
    let down = if view.destination_down {
        Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)
    } else {
        Style::new()
    };
    let lines = vec![
        Line::raw(format!(
            "latency    p50 {}  p99 {}",
            latency(view.latency_recent.0),
            latency(view.latency_recent.1)
        )),
        Line::raw(format!(
            "limit      {}  in flight {}",
            view.concurrency_limit, view.in_flight
        )),
        Line::raw(format!(
            "rate cap   {}",
            rate_cap(view.rate_cap, view.quota_left)
        )),
        Line::raw(format!("retry wait {} exports", view.retry_waiting)),
        match &view.paused_since {
            Some(since) => Line::styled(
                format!("endpoint   paused since {since}"),
                Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD),
            ),
            None => Line::styled(
                format!("endpoint   {}", destination(view.destination_down)),
                down,
            ),
        },
        Line::raw(format!(
            "token      {} ({} requested)",
            view.token.describe(),
            view.token_fetches.total
        )),
    ];
    frame.render_widget(Paragraph::new(lines).block(block("Delivery")), area);
}

fn outbox(frame: &mut Frame, area: Rect, view: &View, row: Row) {
    let dead = if view.dead > 0 {
        Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD)
    } else {
        Style::new()
    };
    let mut lines = vec![
        Line::raw(format!("pending    {}", view.pending)),
        Line::styled(format!("dead       {}", view.dead), dead),
        Line::raw(format!(
            "profiles   {}",
            super::view::profiles(view.profiles)
        )),
        Line::raw(format!(
            "oldest     {}",
            view.oldest_waited_s
                .map_or("-".to_owned(), |s| format!("waited {}", duration(s)))
        )),
        Line::raw(format!("clock jumps {}", view.clock_jumps)),
    ];
    if let Some(lag) = &view.source_lag {
        lines.push(Line::raw(format!("NATS lag   {lag}")));
    }
    frame.render_widget(Paragraph::new(lines).block(block_in("Outbox", row)), area);
}

/// The last points of `history` that fit, the latest on the right, with the latest value and,
/// given the seconds between points (one a snapshot), the span shown in the title.
fn sparkline(
    frame: &mut Frame,
    area: Rect,
    title: &str,
    history: &[u64],
    seconds_a_point: Option<f64>,
    row: Row,
) {
    let width = area.width.saturating_sub(2) as usize;
    let shown = &history[history.len().saturating_sub(width)..];
    let latest = shown.last().copied().unwrap_or(0);
    let title = match seconds_a_point {
        Some(each) => {
            let span = (shown.len() as f64 * each).round() as u64;
            format!("{title}: {latest}, last {}", duration(span))
        }
        None => format!("{title} {latest}"),
    };
    frame.render_widget(
        Sparkline::default()
            .block(block_in(&title, row))
            .data(shown)
            .style(Style::new().fg(Color::Cyan)),
        area,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::top::view::{AuthKind, History, Snapshot};
    use serde_json::json;

    fn sample_view() -> View {
        let metrics = "outpost_updates_total{result=\"exported\"} 1520\n\
            outpost_exports_total{reason=\"segment\"} 1400\n\
            outpost_deliveries_total{outcome=\"delivered\"} 1490\n\
            outpost_deliveries_total{outcome=\"retried\"} 31\n\
            outpost_delivery_retries_total{cause=\"rate_limited\"} 31\n\
            outpost_delivery_latency_seconds_bucket{le=\"0.004\"} 1000\n\
            outpost_delivery_latency_seconds_bucket{le=\"0.008\"} 1490\n\
            outpost_delivery_latency_seconds_bucket{le=\"+Inf\"} 1490\n\
            outpost_token_fetches_total 3\n\
            outpost_delivery_concurrency_limit 17\n\
            outpost_delivery_in_flight 5\n\
            outpost_delivery_rate_cap 240\n\
            outpost_delivery_retry_waiting 4\n\
            outpost_outbox_pending 30\n\
            outpost_outbox_dead 2\n";
        let earlier = Snapshot::from_answer(0.0, &json!({"metrics": "", "stats": {}})).unwrap();
        let now = Snapshot::from_answer(
            2.0,
            &json!({"metrics": metrics,
                    "stats": {"pending": 30, "oldest_pending_waited_s": 7, "run_time_s": 3725, "profiles": 1000},
                    "token_expires_in_s": 3125}),
        )
        .unwrap();
        let mut history = History::new(HISTORY_POINTS);
        for pending in [0u64, 400, 900, 300, 30] {
            let mut s = now.clone();
            s.stats["pending"] = pending.into();
            history.push(&s);
        }
        view(
            &earlier,
            &now,
            &history,
            AuthKind::OAuth2,
            "/var/lib/outpost",
        )
    }

    use crate::top::view::view;

    fn assert_shows(screen: &str, expected: &[&str]) {
        if std::env::var_os("OUTPOST_SHOW_SCREEN").is_some() {
            println!("{screen}");
        }
        for text in expected {
            assert!(screen.contains(text), "{text:?} missing from:\n{screen}");
        }
    }

    #[test]
    fn wide_terminal() {
        let screen = render_text(&sample_view(), 120, 36);
        assert_eq!(screen.lines().count(), 36);
        assert_shows(
            &screen,
            &[
                "outpost top  /var/lib/outpost  run time 1h 2m",
                "Updates/s (total)",
                "exported   760.0    1520",
                "Exports/s",
                "segment",
                "Deliveries/s",
                "delivered",
                "Retries/s",
                "rate_limited",
                "latency    p50 2.98 ms  p99 7.88 ms",
                "limit      17  in flight 5",
                "rate cap   240/s (after 429s)",
                "retry wait 4 exports",
                "endpoint   up",
                "token      expires in 52m 5s (3 requested)",
                "pending    30",
                "dead       2",
                "profiles   1000",
                "oldest     waited 7s",
                // Five snapshots, two seconds apart.
                "Outbox pending: 30, last 10s",
                "Oldest waited (s): 7",
            ],
        );
    }

    #[test]
    fn small_terminal() {
        let screen = render_text(&sample_view(), 80, 24);
        assert_eq!(screen.lines().count(), 24);
        assert!(screen.lines().all(|l| l.chars().count() <= 80));
        assert_shows(
            &screen,
            &[
                "outpost top",
                "Updates/s",
                "exported",
                "760.0",
                "Deliveries/s",
                "745.0",
                "Retries/s",
                "rate_limited",
                "limit      17  in flight 5",
                "rate cap   240/s",
                "endpoint   up",
                "pending    30",
                "dead       2",
                "Pending 30",
            ],
        );
    }

    #[test]
    fn the_stream_lag_shows_at_either_size() {
        let mut v = sample_view();
        v.source_lag = Some("120 messages".into());
        for (width, height) in [(80, 24), (120, 36), (100, 30)] {
            let screen = render_text(&v, width, height);
            assert_shows(
                &screen,
                &["NATS lag   120 messages", "clock jumps none noticed"],
            );
        }
    }

    #[test]
    fn a_notice_and_a_destination_down() {
        let mut v = sample_view();
        v.destination_down = true;
        v.notice = Some("no answer from the agent since 10:00:00".into());
        let screen = render_text(&v, 100, 30);
        assert_shows(
            &screen,
            &[
                "no answer from the agent since 10:00:00",
                "endpoint   down: probing one request at a time",
            ],
        );
    }

    #[test]
    fn a_pause_shows_where_the_endpoint_does_at_either_size() {
        let mut v = sample_view();
        v.paused_since = Some("2026-01-01T00:00:05.000Z".into());
        for (width, height) in [(80, 24), (120, 36), (100, 30)] {
            let screen = render_text(&v, width, height);
            assert_shows(&screen, &["endpoint   paused since 2026-01-01"]);
        }
    }
}
