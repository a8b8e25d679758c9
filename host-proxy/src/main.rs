//! host-proxy binary: parse, set up tracing, run.
#![forbid(unsafe_code)]

fn main() -> anyhow::Result<()> {
    let (config, origin) = common::config_file::parse::<host_proxy::Config>();
    if let Err(e) = config.check(&origin) {
        common::config_file::ConfigError::File(e).exit();
    }
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
    runtime.block_on(host_proxy::run(config))?;
    // Connection tasks still running are dropped here, which closes their sockets.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(())
}
