//! `rdbd create-md` and `rdbd show-md`: initialise and inspect this node's metadata.

use std::io::Write;

use anyhow::Context;
use clap::Args;
use rdbd::metadata::store::{self, CreateOptions};
use rdbd::metadata::superblock::flags;

use super::human_size;
use super::resource::{Resource, ResourceArgs};

#[derive(Args, Debug)]
pub struct CreateMdArgs {
    #[command(flatten)]
    pub resource: ResourceArgs,
    /// Overwrite existing rdbd metadata (its bitmap and generation identifiers are lost).
    #[arg(long)]
    pub force: bool,
}

pub fn create_md(args: CreateMdArgs) -> anyhow::Result<()> {
    let res = Resource::load(&args.resource)?;
    let me = res.me();
    let bitmap_block =
        u32::try_from(res.config.disk.bitmap_block).context("bitmap-block does not fit 32 bits")?;
    let opts =
        CreateOptions { bitmap_block, al_extents: res.config.disk.al_extents, node_name: me.name.clone() };
    let layout = store::create(&me.disk, &res.meta_location(), &opts, args.force)?;
    println!(
        "rdbd: created metadata for {} on node {} ({}): {} of data, {} bitmap pages, activity log of {} extents",
        res.config.name,
        me.name,
        me.disk.display(),
        human_size(layout.data_size),
        layout.bitmap_pages,
        layout.al_extents,
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct ShowMdArgs {
    #[command(flatten)]
    pub resource: ResourceArgs,
}

/// Prints the superblock, generation identifiers, dirty blocks and activity log of this node.
pub fn show_md(args: ShowMdArgs) -> anyhow::Result<()> {
    let res = Resource::load(&args.resource)?;
    let me = res.me();
    let attached = store::attach(&me.disk, &res.meta_location(), &me.name)?;
    let sb = attached.meta.superblock();
    let layout = attached.meta.layout();
    let g = &sb.generations;
    let names = [
        (flags::CONSISTENT, "consistent"),
        (flags::PRIMARY, "primary"),
        (flags::CRASHED_PRIMARY, "crashed-primary"),
        (flags::UP_TO_DATE, "up-to-date"),
        (flags::AL_CLEAN, "al-clean"),
        (flags::PEER_OUTDATED, "peer-outdated"),
    ];
    let set: Vec<&str> = names.iter().filter(|(f, _)| sb.has(*f)).map(|(_, n)| *n).collect();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "resource {} node {} metadata on {}",
        res.config.name,
        sb.node_name,
        attached.meta.path().display()
    )?;
    writeln!(out, "data-size {} ({})", sb.data_size, human_size(sb.data_size))?;
    writeln!(
        out,
        "bitmap-block {} al-extents {} bitmap-pages {}",
        sb.bitmap_block, sb.al_extents, layout.bitmap_pages
    )?;
    writeln!(
        out,
        "generations current {:016X} bitmap {:016X} history {:016X} {:016X}",
        g.current, g.bitmap, g.history[0], g.history[1]
    )?;
    writeln!(out, "flags {}", if set.is_empty() { "none".to_string() } else { set.join(",") })?;
    let dirty = attached.bitmap.dirty_blocks();
    writeln!(out, "out-of-sync {} blocks ({})", dirty, human_size(dirty * sb.bitmap_block as u64))?;
    let mut extents: Vec<u32> = attached.activity_log.active_extents().collect();
    extents.sort_unstable();
    writeln!(out, "activity-log {} extents{}", extents.len(), if extents.is_empty() { "" } else { ":" })?;
    for chunk in extents.chunks(16) {
        let line: Vec<String> = chunk.iter().map(|e| e.to_string()).collect();
        writeln!(out, "  {}", line.join(" "))?;
    }
    for damage in &attached.report.damage {
        writeln!(out, "damaged: {damage}")?;
    }
    Ok(())
}
