//! The `gru sim` chart: arrivals, capacity and queue over time, as SVG.

use std::path::Path;

use gru_core::sim::SimResult;
use plotters::prelude::*;

const SIZE: (u32, u32) = (1400, 1000);

/// Draws three panels sharing the time axis (hours since the trace began):
/// arrivals; desired and in-service minions of gru and the oracle; gru's
/// queue.
pub fn draw(path: &Path, results: &[SimResult]) -> anyhow::Result<()> {
    let Some(gru) = results.first() else {
        return Ok(());
    };
    let oracle = results.iter().find(|r| r.scaler == "oracle");
    let Some(start) = gru.timeline.first().map(|r| r.at) else {
        return Ok(());
    };
    let hours = |at: jiff::Timestamp| (at.as_second() - start.as_second()) as f64 / 3600.0;
    let end = gru
        .timeline
        .last()
        .map_or(1.0, |r| hours(r.at))
        .max(1.0 / 60.0);

    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((3, 1));

    let max_rate = gru
        .timeline
        .iter()
        .map(|r| r.arrivals_per_s)
        .fold(1.0, f64::max);
    let mut top = ChartBuilder::on(&panels[0])
        .caption("arrivals (messages/s)", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..end, 0.0..max_rate * 1.05)?;
    top.configure_mesh().x_desc("hours").draw()?;
    top.draw_series(LineSeries::new(
        gru.timeline.iter().map(|r| (hours(r.at), r.arrivals_per_s)),
        &BLACK,
    ))?;

    let max_n = results
        .iter()
        .flat_map(|r| r.timeline.iter().map(|row| row.desired.max(row.capacity)))
        .max()
        .unwrap_or(1)
        .max(1);
    let mut mid = ChartBuilder::on(&panels[1])
        .caption(
            "minions: gru desired, gru in service, oracle in service",
            ("sans-serif", 20),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..end, 0.0..f64::from(max_n) * 1.1)?;
    mid.configure_mesh().x_desc("hours").draw()?;
    mid.draw_series(LineSeries::new(
        gru.timeline
            .iter()
            .map(|r| (hours(r.at), f64::from(r.desired))),
        &BLUE,
    ))?
    .label("gru desired")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    mid.draw_series(LineSeries::new(
        gru.timeline
            .iter()
            .map(|r| (hours(r.at), f64::from(r.in_service))),
        &GREEN,
    ))?
    .label("gru in service")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN));
    if let Some(o) = oracle {
        mid.draw_series(LineSeries::new(
            o.timeline
                .iter()
                .map(|r| (hours(r.at), f64::from(r.in_service))),
            &RED,
        ))?
        .label("oracle in service")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    }
    mid.configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;

    let max_q = gru.timeline.iter().map(|r| r.queued).fold(1.0, f64::max);
    let mut bottom = ChartBuilder::on(&panels[2])
        .caption("gru queue (messages)", ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..end, 0.0..max_q * 1.05)?;
    bottom.configure_mesh().x_desc("hours").draw()?;
    bottom.draw_series(LineSeries::new(
        gru.timeline.iter().map(|r| (hours(r.at), r.queued)),
        &MAGENTA,
    ))?;
    root.present()?;
    Ok(())
}
