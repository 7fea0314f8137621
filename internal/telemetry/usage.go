package telemetry

// Usage is one round's per-pod accounting: what each container's
// processes use of each device, and what processes outside any allocation
// use. Immutable once published.
type Usage struct {
	// Pods has one entry per container and device, sorted by target,
	// namespace, pod, container. A container allocated a device that runs
	// nothing on it reads 0.
	Pods []PodUsage
	// Unattributed has one entry per device with processes that belong
	// to no pod allocated that device: a host process, a pod that set
	// NVIDIA_VISIBLE_DEVICES=all, a process whose pod is not known yet.
	Unattributed []UnitUsage
}

// UnitUsage is the summed use of some processes on one device.
type UnitUsage struct {
	Target      int    // index into the snapshot's Layout.Targets
	MemoryBytes uint64 // framebuffer used
	// SMUtil is the summed SM utilization of the processes, in percent;
	// meaningful only with HasSMUtil (never on MIG devices, where NVML
	// has no per-process utilization).
	SMUtil    float64
	HasSMUtil bool
	Processes int
}

// PodUsage is one container's use of one device.
type PodUsage struct {
	UnitUsage
	Namespace, Pod, PodUID, Container string
}
