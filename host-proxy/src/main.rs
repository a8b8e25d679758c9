//! host-proxy binary: parse, set up tracing, run.
#![forbid(unsafe_code)]

fn main() -> anyhow::Result<()> {
    let args = std::env::args_os().collect();
    let loaded = common::config_file::try_parse_sections::<host_proxy::Config>(
        args,
        &host_proxy::config::PER_ENCLAVE,
    )
    .unwrap_or_else(|e| e.exit());
    if let Err(e) = host_proxy::config::check(&loaded) {
        common::config_file::ConfigError::File(e).exit();
    }
    let configs: Vec<host_proxy::Config> = loaded.into_iter().map(|(c, _)| c).collect();
    let config = &configs[0];
    common::sys::pin_mmap_threshold();
    common::telemetry::init(config.log_format);
    let runtime = match config.threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if n > 1 {
                b.worker_threads(n);
            }
            b.enable_all().build()?
        }
    };
    runtime.block_on(host_proxy::run(configs))?;
    // Connection tasks still running are dropped here, which closes their sockets.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(())
}
