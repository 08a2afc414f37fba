//! `provisioner reconcile`: compare with Clerk's Backend API, report the drift,
//! repair it (see `crate::reconcile` for the rules).

use std::io::IsTerminal;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::clerk::api::ClerkApi;
use crate::config::Settings;
use crate::progress::Progress;
use crate::provision::Provisioner;
use crate::reconcile::{Reconciler, Report, RunOptions};

/// Arguments of `reconcile`.
#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// Only this organization (and its memberships).
    #[arg(long)]
    pub org: Option<String>,
    /// Report the drift, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// One JSON document on stdout instead of the summary line.
    #[arg(long)]
    pub json: bool,
    /// Apply more removals than `[reconcile] max_removals`.
    #[arg(long)]
    pub yes: bool,
}

/// A terminal progress bar.
struct Bar(ProgressBar);

impl Progress for Bar {
    fn phase(&self, name: &'static str, total: Option<u64>) {
        self.0.set_position(0);
        match total {
            Some(n) => self.0.set_length(n),
            None => self.0.unset_length(),
        }
        self.0.set_message(name);
    }

    fn advance(&self, n: u64) {
        self.0.inc(n);
    }
}

/// Runs `reconcile`.
pub async fn run(settings: &Settings, args: ReconcileArgs) -> anyhow::Result<()> {
    let api = ClerkApi::new(&settings.clerk, &settings.reconcile)?;
    let pool = crate::db::prepare(&settings.database)
        .await
        .context("preparing the database")?;
    let reconciler = Reconciler::new(
        api,
        Provisioner::new(settings.provisioning.clone()),
        pool,
        settings.reconcile.max_removals,
    );
    let opts = RunOptions {
        dry_run: args.dry_run,
        yes: args.yes,
    };
    let show = !args.json && std::io::stderr().is_terminal();
    let bar = if show {
        ProgressBar::new_spinner()
    } else {
        ProgressBar::hidden()
    };
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} {pos}/{len} {bar:30}") {
        bar.set_style(style);
    }
    let report: Report = match &args.org {
        Some(org) => reconciler.sync_one(org, &opts).await?.0,
        None => reconciler.run(&opts, &Bar(bar.clone())).await?,
    };
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for d in &report.drift {
            println!(
                "{:<18} {} {} {}",
                d.kind.as_str(),
                d.workspace_id,
                d.user_id.as_deref().unwrap_or("-"),
                d.detail
            );
        }
        println!("{}", report.summary());
    }
    if let Some(refused) = report.refused {
        anyhow::bail!("{refused}");
    }
    Ok(())
}
