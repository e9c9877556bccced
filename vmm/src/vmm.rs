//! Builds a VM from a [`VmConfig`], runs it to completion and reports.

use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use kvm_ioctls::IoEventAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::{self, VirtioMmioSlot};
use crate::api::{ApiHandler, ApiListener, ApiResponse, ApiServer};
use crate::boot;
use crate::config::{QueueNotify, VmConfig};
use crate::control::{ExitReason, VmControl};
use crate::devices::bus::{Bus, BusDevice};
use crate::devices::power::{AcpiPower, I8042};
use crate::devices::serial::{ConsoleOut, SerialDevice};
use crate::devices::virtio::VirtioDevice;
use crate::devices::virtio::mmio::{MmioTransport, QUEUE_NOTIFY_OFFSET, WINDOW_SIZE};
use crate::event_loop::{
    self, SignalWatcher, StdinInput, StopWatcher, Subscriber, VirtioQueueEvents,
};
use crate::kvm::vcpu::{self, Vcpu, VcpuStats};
use crate::kvm::{KvmError, Vm};
use crate::layout::{
    ACPI_SLEEP_CONTROL_PORT, COM1_PORT, I8042_DATA_PORT, IRQ_MAX, SERIAL_IRQ, VIRTIO_IRQ_BASE,
    VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START,
};
use crate::memory::{MemoryError, VmMemory};
use crate::report::MemoryReport;

/// What stopped the VM from being built or run.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Guest memory.
    #[error("guest memory set-up failed")]
    Memory(#[from] MemoryError),
    /// KVM.
    #[error("KVM set-up failed")]
    Kvm(#[from] KvmError),
    /// Loading the kernel.
    #[error("cannot load the guest")]
    Boot(#[from] boot::BootError),
    /// ACPI.
    #[error("cannot build the ACPI tables")]
    Acpi(#[from] acpi::AcpiError),
    /// Event loop.
    #[error("event loop set-up failed")]
    EventLoop(#[from] event_loop::EventLoopError),
    /// API socket.
    #[error("API socket set-up failed")]
    Api(#[from] crate::api::ApiError),
    /// Device wiring.
    #[error("cannot wire device {0}")]
    Device(&'static str, #[source] std::io::Error),
    /// Too many virtio devices for the IOAPIC.
    #[error("too many virtio devices ({0})")]
    TooManyDevices(usize),
    /// A thread could not be started.
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
}

/// What a device crate adds to a VM: virtio devices and API endpoints. Built by a closure
/// that receives the VM's memory, so a device can hand guest ranges back to guest-mm.
#[derive(Default)]
pub struct Plugins {
    /// Virtio devices, one virtio-mmio window each, in order.
    pub devices: Vec<Box<dyn VirtioDevice>>,
    /// Handler for API paths other than `/` and `/vm`.
    pub api: Option<Box<dyn ApiHandler>>,
}

/// The result of a run.
pub struct RunOutcome {
    /// Why the VM stopped.
    pub reason: ExitReason,
    /// Memory figures at stop.
    pub report: MemoryReport,
    /// Time from start to stop.
    pub elapsed: Duration,
    /// Per-vCPU counters.
    pub vcpu_stats: Vec<VcpuStats>,
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> VmmError {
    move |e| VmmError::Device(what, e)
}

fn kvm_io(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |e| VmmError::Device(what, std::io::Error::from_raw_os_error(e.errno()))
}

struct StatusHandler {
    config: VmConfig,
    memory: Arc<VmMemory>,
    started: Instant,
    control: Arc<VmControl>,
    extra: Option<Box<dyn ApiHandler>>,
}

/// A device's part of `GET /memory`: its key and its figures.
type DeviceFigures = (&'static str, serde_json::Value);

impl StatusHandler {
    /// The memory report and the devices' part of the figures (`GET /memory`, `/metrics`).
    fn figures(&mut self) -> Result<(MemoryReport, Option<DeviceFigures>), ApiResponse> {
        let report = self
            .memory
            .report()
            .map_err(|e| ApiResponse::error(500, &format!("cannot read the figures: {e}")))?;
        Ok((report, self.extra.as_mut().and_then(|e| e.memory_figures())))
    }

    fn metrics(&mut self) -> ApiResponse {
        let (report, devices) = match self.figures() {
            Ok(f) => f,
            Err(refusal) => return refusal,
        };
        match crate::metrics::render(&report, devices.as_ref().map(|(_, v)| v)) {
            Ok(t) => ApiResponse::text(t),
            Err(e) => ApiResponse::error(500, &format!("cannot encode the metrics: {e}")),
        }
    }

    /// `PUT /memory/reclaim` (body `{}`): the explicit sweep of empty tables.
    fn reclaim(&mut self, body: &[u8]) -> ApiResponse {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Sweep {}
        if let Err(refusal) = crate::api::parse_body::<Sweep>(body) {
            return refusal;
        }
        let t = Instant::now();
        // Table bytes only where guest-mm tracks pages (as the report gives them).
        let tables = self
            .memory
            .tracked()
            .then(|| self.memory.guest_mm().tables());
        let before = tables.map(|t| t.stats().table_bytes);
        match self.memory.reclaim() {
            Ok((freed, blocks)) => ApiResponse::ok(serde_json::json!({
                "tables_freed": {"pt": freed[0], "pd": freed[1], "pdpt": freed[2], "pml4": freed[3]},
                "blocks_emptied": blocks,
                "table_bytes_before": before,
                "table_bytes_after": tables.map(|t| t.stats().table_bytes),
                "min_table_bytes": tables.map(|t| t.min_table_bytes()),
                "ns": u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX),
            })),
            Err(e) => ApiResponse::error(500, &format!("the sweep failed: {e}")),
        }
    }

    fn memory(&mut self) -> ApiResponse {
        let (report, devices) = match self.figures() {
            Ok(f) => f,
            Err(refusal) => return refusal,
        };
        let mut body = serde_json::Map::new();
        body.insert(
            "memory".into(),
            serde_json::to_value(report).unwrap_or_default(),
        );
        if let Some((key, figures)) = devices {
            body.insert(key.into(), figures);
        }
        ApiResponse::ok(body.into())
    }
}

impl ApiHandler for StatusHandler {
    fn handle(&mut self, method: &str, path: &str, body: &[u8]) -> ApiResponse {
        match (method, path) {
            // Firecracker's instance information.
            ("GET", "/") => crate::preboot::instance_info("Running"),
            ("GET", "/vm") => {
                let report = self.memory.report();
                ApiResponse::ok(serde_json::json!({
                    "state": if self.control.should_stop() { "stopping" } else { "running" },
                    "uptime_ms": self.started.elapsed().as_millis() as u64,
                    "config": self.config,
                    "memory": report.ok(),
                }))
            }
            ("GET", "/memory") => self.memory(),
            ("GET", "/metrics") => self.metrics(),
            ("PUT", "/memory/reclaim") => self.reclaim(body),
            ("GET", "/vm/config") => {
                ApiResponse::ok(crate::preboot::firecracker_view(&self.config))
            }
            // Firecracker's configuration: readable, no longer changeable.
            ("GET", "/machine-config") => {
                ApiResponse::json(&crate::preboot::MachineConfig::of(&self.config))
            }
            ("PUT", "/boot-source" | "/machine-config") | ("PATCH", "/machine-config") => {
                ApiResponse::fault(crate::api::NOT_AFTER_START)
            }
            ("PUT", "/actions") => actions(body),
            _ => match &mut self.extra {
                Some(extra) => extra.handle(method, path, body),
                None => ApiResponse::unknown(method, path),
            },
        }
    }
}

/// `PUT /actions` once the VM runs (Firecracker's rules; the body is read as before start).
fn actions(body: &[u8]) -> ApiResponse {
    use crate::preboot::{Action, ActionType};
    match crate::api::parse_body::<Action>(body).map(|a| a.action_type) {
        Err(refusal) => refusal,
        Ok(ActionType::InstanceStart) => ApiResponse::fault(crate::api::NOT_AFTER_START),
        // ebb writes no metrics file, so there is nothing to flush (Firecracker answers the
        // same when none was configured).
        Ok(ActionType::FlushMetrics) => ApiResponse::no_content(),
        Ok(ActionType::SendCtrlAltDel) => {
            ApiResponse::fault("ebb's keyboard controller cannot send Ctrl+Alt+Del to the guest.")
        }
    }
}

/// Builds and runs the VM described by `config`; `plug` adds devices and API endpoints once
/// guest memory exists. `api` is the API socket when it is already bound (configured over
/// the API before start); otherwise `config.api_sock` is bound, if set.
pub fn run(
    config: VmConfig,
    plug: impl FnOnce(&Arc<VmMemory>) -> Plugins,
    api: Option<ApiListener>,
) -> Result<RunOutcome, VmmError> {
    let started = Instant::now();
    let control = Arc::new(VmControl::new().map_err(io("stop eventfd"))?);
    // Before any thread exists, so every thread inherits the blocked mask.
    let signal_fd = event_loop::block_stop_signals()?;

    let memory = Arc::new(VmMemory::new(&config)?);
    let vm = Vm::new(!config.machine.full_xsave, config.machine.hlt_in_guest)?;
    // SAFETY: guest RAM is mapped for the rest of the process's life (see `memory`).
    unsafe { vm.add_ram(memory.host_addr(), memory.size() as u64)? };
    let mem = memory.vm_memory().clone();

    let entry = boot::load_linux(
        &mem,
        memory.size() as u64,
        &config.boot.kernel,
        config.boot.initrd.as_deref(),
        &config.boot.cmdline,
        config.boot.pvh,
    )?;

    let Plugins {
        devices,
        api: extra_api,
    } = plug(&memory);
    let mut pio = Bus::new();
    let mut mmio = Bus::new();

    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io("serial irq"))?;
    vm.fd()
        .register_irqfd(&serial_irq, SERIAL_IRQ)
        .map_err(kvm_io("serial irqfd"))?;
    let console = ConsoleOut::new(Box::new(std::io::stdout()), control.clone());
    let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, console)));
    let bus_err = |what: &'static str| {
        move |e: crate::devices::bus::BusError| VmmError::Device(what, std::io::Error::other(e))
    };
    pio.insert(serial.clone(), u64::from(COM1_PORT), 8)
        .map_err(bus_err("COM1"))?;
    let power: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(AcpiPower::new(control.clone())));
    pio.insert(power, u64::from(ACPI_SLEEP_CONTROL_PORT), 3)
        .map_err(bus_err("ACPI power"))?;
    let i8042: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(I8042::new(control.clone())));
    pio.insert(i8042, u64::from(I8042_DATA_PORT), 5)
        .map_err(bus_err("i8042"))?;

    let max_devices = (IRQ_MAX - VIRTIO_IRQ_BASE + 1) as usize;
    if devices.len() > max_devices {
        return Err(VmmError::TooManyDevices(devices.len()));
    }
    let mut transports = Vec::new();
    let mut slots = Vec::new();
    for (i, device) in devices.into_iter().enumerate() {
        let base = VIRTIO_MMIO_START + i as u64 * VIRTIO_MMIO_SIZE;
        let irq = VIRTIO_IRQ_BASE + i as u32;
        let irq_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(io("virtio irq"))?;
        vm.fd()
            .register_irqfd(&irq_evt, irq)
            .map_err(kvm_io("virtio irqfd"))?;
        let mut transport = MmioTransport::new(device, mem.clone(), irq_evt)
            .map_err(|e| VmmError::Device("virtio-mmio", std::io::Error::other(e)))?;
        let inline = config.machine.queue_notify == QueueNotify::Vcpu;
        transport.set_inline_notify(inline);
        // Inline notification: no ioeventfd, so the write exits to the vCPU thread.
        let events = if inline {
            &[][..]
        } else {
            transport.queue_events()
        };
        for (q, evt) in events.iter().enumerate() {
            vm.fd()
                .register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                    q as u32,
                )
                .map_err(kvm_io("virtio ioeventfd"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(transport.clone(), base, WINDOW_SIZE)
            .map_err(bus_err("virtio-mmio"))?;
        transports.push(transport);
        slots.push(VirtioMmioSlot {
            base: base as u32,
            len: WINDOW_SIZE as u32,
            irq,
        });
    }
    let tables = acpi::build_tables(config.machine.vcpus, &slots)?;
    acpi::write_tables(&mem, &tables)?;

    vcpu::install_kick_handler()
        .map_err(|e| VmmError::Thread(std::io::Error::from_raw_os_error(e.errno())))?;
    let pio = Arc::new(pio);
    let mmio = Arc::new(mmio);
    let mut vcpus = Vec::new();
    for index in 0..config.machine.vcpus {
        let fd = vm.create_vcpu(index, config.machine.vcpus, &mem, entry)?;
        vcpus.push(Vcpu::new(
            index,
            fd,
            pio.clone(),
            mmio.clone(),
            control.clone(),
        ));
    }

    let mut manager: EventManager<Subscriber> =
        EventManager::new().map_err(event_loop::EventLoopError::Manager)?;
    manager.add_subscriber(Box::new(StopWatcher::new(control.clone())));
    manager.add_subscriber(Box::new(SignalWatcher::new(signal_fd, control.clone())));
    manager.add_subscriber(Box::new(StdinInput::new(serial.clone())));
    // Zaps wait for the transports' locks: no queue chain is being handled on any thread then.
    let chains = transports.clone();
    manager.add_subscriber(Box::new(VirtioQueueEvents::new(transports)));
    let api = match (api, &config.api_sock) {
        (Some(sock), _) => Some(sock),
        (None, Some(path)) => Some(ApiListener::bind(path)?),
        (None, None) => None,
    };
    if let Some(sock) = api {
        let handler = StatusHandler {
            config: config.clone(),
            memory: memory.clone(),
            started,
            control: control.clone(),
            extra: extra_api,
        };
        manager.add_subscriber(Box::new(ApiServer::serve(sock, Box::new(handler))));
    }

    // Every vCPU thread installs its filter, then waits for this thread to install its own:
    // no guest code runs before every thread is filtered.
    let mut handles = Vec::new();
    let mut go = Vec::new();
    for v in vcpus {
        let (tx, rx) = std::sync::mpsc::channel();
        match v.spawn(rx) {
            Ok(h) => {
                handles.push(h);
                go.push(tx);
            }
            Err(e) => {
                control.request_stop(ExitReason::HostError(format!("cannot start vCPU: {e}")));
                break;
            }
        }
    }
    let filtered = crate::seccomp::install(crate::seccomp::ThreadKind::EventLoop, 0);
    match &filtered {
        Err(e) => control.request_stop(ExitReason::HostError(e.to_string())),
        Ok(()) => match crate::seccomp::mode() {
            crate::seccomp::SeccompMode::Off => log::info!("seccomp filters off"),
            crate::seccomp::SeccompMode::Log => {
                log::warn!("seccomp filters in log mode: calls outside the lists are only logged")
            }
            crate::seccomp::SeccompMode::On => log::info!("seccomp filters on every thread"),
        },
    }
    for tx in go {
        // A vCPU whose thread already ended (its filter failed) is not waiting.
        let _ = tx.send(filtered.is_ok());
    }

    let mut panic_since: Option<Instant> = None;
    while !control.should_stop() {
        if let Err(e) = manager.run_with_timeout(100) {
            control.request_stop(ExitReason::HostError(format!("event loop: {e:?}")));
        }
        // Between event dispatches: off the vCPU threads, never inside a queue chain.
        if let Err(e) = memory.release_pending_if_due() {
            log::error!("cannot release the balloon's pending pages: {e}");
        }
        if memory.kvm_zap_due(config.memory.zap_kvm_tables_after) {
            let _no_chain: Vec<_> = chains
                .iter()
                .map(|t| t.lock().unwrap_or_else(|p| p.into_inner()))
                .collect();
            match vm.zap_nested_tables() {
                Ok(took) => memory.record_kvm_zap(took),
                Err(e) => {
                    log::error!("cannot make KVM drop its nested tables: {e}");
                    memory.record_kvm_zap(Duration::ZERO);
                }
            }
        }
        // A printed panic with panic=0 leaves the guest spinning: give it a second to
        // print its trace and reboot, then stop.
        if control.panic_seen() {
            let since = *panic_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(1) {
                control.request_stop(ExitReason::GuestPanic);
            }
        }
    }

    let vcpu_stats = stop_vcpus(handles);
    let _ = std::io::Write::flush(&mut std::io::stdout());
    let report = memory.report()?;
    let reason = control
        .reason()
        .unwrap_or(ExitReason::HostError("stopped without a reason".into()));
    Ok(RunOutcome {
        reason,
        report,
        elapsed: started.elapsed(),
        vcpu_stats,
    })
}

/// Kicks every vCPU out of KVM_RUN until its thread ends.
fn stop_vcpus(handles: Vec<JoinHandle<VcpuStats>>) -> Vec<VcpuStats> {
    let mut stats = Vec::new();
    for h in handles {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !h.is_finished() && Instant::now() < deadline {
            // SAFETY: the thread has not been joined, so its pthread_t is valid; the kick
            // signal has a handler installed that does nothing.
            unsafe { libc::pthread_kill(h.as_pthread_t(), vcpu::kick_signal()) };
            std::thread::sleep(Duration::from_millis(2));
        }
        if h.is_finished() {
            if let Ok(s) = h.join() {
                stats.push(s);
            }
        } else {
            log::warn!("a vCPU thread did not stop within 5 s");
        }
    }
    stats
}

#[cfg(test)]
#[path = "openapi_tests.rs"]
mod openapi_tests;
