//! enclave-proxy binary: parse, set up tracing, run.
#![forbid(unsafe_code)]

fn main() -> anyhow::Result<()> {
    let (config, _) = common::config_file::parse::<enclave_proxy::Config>();
    common::sys::pin_mmap_threshold();
    common::telemetry::init(config.log_format);
    // One thread: the stack task owns everything and is the only hot path; the enclave kernel
    // and the applications get the other cores.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(enclave_proxy::run(config))?;
    Ok(())
}
