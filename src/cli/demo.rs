//! `rdbd demo`: the zero-setup main job. Serves a fresh sparse file from a temporary directory
//! and prints how to reach it with common NBD clients.

use std::path::PathBuf;

use clap::Args;

use super::serve::ServeArgs;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Size of the demo disk.
    #[arg(long, default_value = "1G", value_parser = super::parse_size)]
    pub size: u64,
    /// TCP address to listen on.
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub listen: String,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("rdbd-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("disk.img");
    let socket = dir.join("nbd.sock");
    let uri = format!("nbd://{}/", args.listen);
    println!("rdbd demo: a fresh {} sparse disk at {}", super::human_size(args.size), file.display());
    println!("Try, from another terminal:");
    println!("  nbdinfo {uri}");
    println!("  qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' {uri}");
    println!("  fio --name=demo --ioengine=nbd --uri={uri} --rw=randrw --bs=4k --iodepth=32 --size=256M --verify=crc32c");
    println!("  nbdinfo --map {uri}");
    println!("Press Ctrl-C to stop; the temporary directory is removed.");
    let serve = ServeArgs {
        file: Some(file),
        device: None,
        size: Some(args.size),
        listen: Some(args.listen),
        unix: Some(socket),
        export: String::new(),
        description: Some("rdbd demo disk".into()),
        read_only: false,
        direct: false,
    };
    let result = super::serve::run(serve).await;
    let cleanup: PathBuf = dir;
    std::fs::remove_dir_all(&cleanup).ok();
    result
}
