// Package nvmlbackend reads GPU telemetry through NVML, mapping each DCGM
// field to its NVML source and converting units to DCGM's (see
// dcgm-exporter-compat.md §7): framebuffer bytes to MiB, power mW to W,
// GPM percentages to DCGM's 0–1 ratios. Fields NVML cannot supply on a GPU
// (memory temperature on GDDR parts, profiling before Hopper, utilization
// on MIG, NVLink on GPUs without it) are left out, never reported as zero.
// NVLink bandwidth and PCIe rates follow DCGM's arithmetic (throughput.go).
//
// With Request.Processes it also lists each target's compute processes
// and MPS clients, with per-process SM utilization on whole GPUs
// (processes.go).
//
// Every call goes through the guarded nvml.Library. GPUs are read in
// parallel, one goroutine each; a GPU whose call hangs is reported as
// timed out and skipped, not waited for, until that call returns.
package nvmlbackend

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
	"github.com/gpu-plugin/gpu-plugin/internal/telemetry"
)

// Options configure the backend.
type Options struct {
	Lib *nvml.Library
	// XIDs returns the last XID seen on each GPU, by NVML index (absent:
	// none yet, served as 0), or nil while XIDs are not being watched. The
	// health monitor owns NVML's event set, so it is the source. A nil
	// func or a nil answer leaves DCGM_FI_DEV_XID_ERRORS out.
	XIDs   func() map[int]uint64
	Logger *slog.Logger
}

// Backend is the NVML telemetry backend.
type Backend struct {
	lib  *nvml.Library
	xids func() map[int]uint64
	log  *slog.Logger

	mu     sync.Mutex
	gpus   map[string]*gpuState // by GPU UUID
	inv    *nvml.Inventory      // the inventory gpus was last pruned for
	closed bool
}

// gpuState is one GPU's reading state. While a worker reads the GPU it
// owns the state (busy); nobody else touches it.
type gpuState struct {
	busy bool
	// unsupported are fields NVML answered NOT_SUPPORTED for (by target
	// key), so later rounds skip those calls.
	unsupported map[string]telemetry.Mask
	gpm         map[string]*gpmState // by target key; nil: GPM not supported
	gpmChecked  bool
	procs       procState   // compute processes (processes.go)
	nvlink      nvlinkState // the previous NVLink reading (throughput.go)
	// migOn is the GPU's MIG mode when last read (migKnown): NVML answers
	// some calls NOT_SUPPORTED only while MIG is on (remapped rows), so a
	// change forgets what the GPU did not support.
	migOn, migKnown bool
}

// New builds the backend.
func New(opts Options) *Backend {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	return &Backend{lib: opts.Lib, xids: opts.XIDs, log: opts.Logger, gpus: map[string]*gpuState{}}
}

// Name implements telemetry.Backend.
func (b *Backend) Name() string { return telemetry.BackendNVML }

var errBusy = errors.New("an earlier NVML call on this GPU has not returned yet")

type job struct {
	gpu  *nvml.GPU
	idx  []int // request target indices
	res  []telemetry.Result
	done chan struct{}
}

// Sample implements telemetry.Backend.
func (b *Backend) Sample(ctx context.Context, req *telemetry.Request) error {
	var xids map[int]uint64
	if b.xids != nil && req.Fields.Has(telemetry.XIDErrors) {
		xids = b.xids()
	}
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		return errors.New("nvml telemetry backend closed")
	}
	if req.Inventory != b.inv {
		b.prune(req.Inventory)
	}
	var jobs []*job
	for i := 0; i < len(req.Targets); {
		g := req.Targets[i].GPU
		j := &job{gpu: g}
		for ; i < len(req.Targets) && req.Targets[i].GPU == g; i++ {
			j.idx = append(j.idx, i)
		}
		st := b.gpus[g.UUID]
		if st == nil {
			st = &gpuState{unsupported: map[string]telemetry.Mask{}}
			b.gpus[g.UUID] = st
		}
		if st.busy {
			for _, k := range j.idx {
				req.Out[k].Err = errBusy
			}
			continue
		}
		st.busy = true
		j.res = make([]telemetry.Result, len(j.idx))
		j.done = make(chan struct{})
		jobs = append(jobs, j)
		targets := make([]telemetry.Target, len(j.idx))
		for k, ti := range j.idx {
			targets[k] = req.Targets[ti]
		}
		go func() {
			defer close(j.done)
			b.readGPU(req.Inventory, st, targets, req.Fields, req.Processes, xids, j.res)
			b.mu.Lock()
			st.busy = false
			b.mu.Unlock()
		}()
	}
	b.mu.Unlock()

	timedOut := false
	for _, j := range jobs {
		if !timedOut {
			select {
			case <-j.done:
			case <-ctx.Done():
				timedOut = true
			}
		}
		if timedOut {
			select {
			case <-j.done:
			default:
				for _, k := range j.idx {
					req.Out[k].Err = telemetry.ErrTimeout
				}
				continue
			}
		}
		for k, ti := range j.idx {
			req.Out[ti] = j.res[k]
		}
	}
	return nil
}

// prune forgets GPUs and MIG devices gone from the inventory, freeing
// their GPM samples. Called with b.mu held.
func (b *Backend) prune(inv *nvml.Inventory) {
	b.inv = inv
	keep := map[string]map[string]bool{}
	if inv != nil {
		for i := range inv.GPUs {
			g := &inv.GPUs[i]
			keys := map[string]bool{g.UUID: true}
			for _, m := range g.MIGDevices {
				keys[m.UUID] = true
			}
			keep[g.UUID] = keys
		}
	}
	for uuid, st := range b.gpus {
		if st.busy {
			continue // its worker still owns it
		}
		keys, ok := keep[uuid]
		if !ok {
			b.freeGPM(st, nil)
			delete(b.gpus, uuid)
			continue
		}
		b.freeGPM(st, keys)
		// A new inventory may have changed the MIG mode, or the driver.
		st.procs.utilOff, st.procs.mpsOff = false, false
		for k := range st.unsupported {
			if !keys[k] {
				delete(st.unsupported, k)
			}
		}
	}
}

// Close frees the GPM samples. It does not wait for calls that hang.
func (b *Backend) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.closed = true
	for _, st := range b.gpus {
		if !st.busy {
			b.freeGPM(st, nil)
		}
	}
	return nil
}

// reader reads one GPU's fields; the first real failure wins.
type reader struct {
	lib   *nvml.Library
	skip  telemetry.Mask // fields known unsupported for this target
	unsup telemetry.Mask // fields found unsupported this round
	err   error
}

// read runs one NVML call for field f and stores its converted value. A
// NOT_SUPPORTED answer leaves the field out (and remembered); any other
// failure fails the target's sample.
func (r *reader) read(v *telemetry.Values, f telemetry.Field, op string, call func() (float64, gonvml.Return)) {
	if r.skip.Has(f) || r.err != nil {
		return
	}
	x, err := nvml.Call(r.lib, op, call)
	switch {
	case err == nil:
		v.Set(f, x)
	case nvml.IsNotSupported(err):
		r.unsup = r.unsup.With(f)
	default:
		r.err = err
	}
}

// readGPU reads a GPU and its MIG devices (targets all belong to one GPU),
// and their compute processes when procs is set.
func (b *Backend) readGPU(inv *nvml.Inventory, st *gpuState, targets []telemetry.Target, fields telemetry.Mask, procs bool, xids map[int]uint64, out []telemetry.Result) {
	g := targets[0].GPU
	h, ok := inv.Handle(g.UUID)
	if !ok {
		for k := range out {
			out[k].Err = fmt.Errorf("no NVML handle for GPU %d (%s)", g.Index, g.UUID)
		}
		return
	}
	b.checkGPM(st, h, targets, fields)
	whole := targets[0].MIG == nil
	if st.migKnown && st.migOn != g.MIGEnabled {
		delete(st.unsupported, g.UUID)
	}
	st.migOn, st.migKnown = g.MIGEnabled, true

	// Device-level fields, shared by every target of this GPU.
	var dev telemetry.Values
	r := &reader{lib: b.lib, skip: st.unsupported[g.UUID]}
	b.readDevice(r, st, h, &dev, fields, whole)
	if whole && st.gpm[g.UUID] == nil {
		readPCIe(r, h, &dev, fields) // no GPM for this GPU: NVML's PCIe counter (throughput.go)
	}
	if fields.Has(telemetry.XIDErrors) && xids != nil {
		dev.Set(telemetry.XIDErrors, float64(xids[g.Index]))
	}
	st.unsupported[g.UUID] = r.skip | r.unsup
	if r.err != nil {
		for k := range out {
			out[k].Err = r.err
		}
		return
	}
	var pr procRound
	for k := range targets {
		t := &targets[k]
		out[k].Values = dev
		th := h // the target's own handle, which lists its processes
		if t.MIG != nil {
			mh, ok := inv.Handle(t.MIG.UUID)
			if !ok {
				out[k].Err = fmt.Errorf("no NVML handle for MIG device %s", t.MIG.UUID)
				continue
			}
			mr := &reader{lib: b.lib, skip: st.unsupported[t.Key]}
			readMemory(mr, mh, &out[k].Values, fields)
			st.unsupported[t.Key] = mr.skip | mr.unsup
			if mr.err != nil {
				out[k].Err = mr.err
				continue
			}
			th = mh
		}
		b.readGPMInto(st, h, t, &out[k].Values, fields)
		if procs {
			b.readProcs(st, th, t, &out[k], &pr)
		}
	}
	if procs {
		b.endProcRound(st, g, &pr)
	}
}

// readDevice reads the GPU-wide fields; whole says the GPU is reported as
// a whole (utilization and memory only then).
func (b *Backend) readDevice(r *reader, st *gpuState, h gonvml.Device, v *telemetry.Values, fields telemetry.Mask, whole bool) {
	u32 := func(x uint32, ret gonvml.Return) (float64, gonvml.Return) { return float64(x), ret }
	if fields.Has(telemetry.SMClock) {
		r.read(v, telemetry.SMClock, "nvmlDeviceGetClockInfo", func() (float64, gonvml.Return) { return u32(h.GetClockInfo(gonvml.CLOCK_SM)) })
	}
	if fields.Has(telemetry.MemClock) {
		r.read(v, telemetry.MemClock, "nvmlDeviceGetClockInfo", func() (float64, gonvml.Return) { return u32(h.GetClockInfo(gonvml.CLOCK_MEM)) })
	}
	if fields.Has(telemetry.GPUTemp) {
		r.read(v, telemetry.GPUTemp, "nvmlDeviceGetTemperature", func() (float64, gonvml.Return) {
			return u32(h.GetTemperature(gonvml.TEMPERATURE_GPU))
		})
	}
	if fields.Has(telemetry.MemoryTemp) {
		r.read(v, telemetry.MemoryTemp, "nvmlDeviceGetFieldValues", func() (float64, gonvml.Return) {
			return nvml.FieldValue(h, gonvml.FI_DEV_MEMORY_TEMP)
		})
	}
	if fields.Has(telemetry.PowerUsage) {
		r.read(v, telemetry.PowerUsage, "nvmlDeviceGetPowerUsage", func() (float64, gonvml.Return) {
			mw, ret := h.GetPowerUsage()
			return float64(mw) / 1000, ret // mW → W
		})
	}
	if fields.Has(telemetry.TotalEnergyConsumption) {
		r.read(v, telemetry.TotalEnergyConsumption, "nvmlDeviceGetTotalEnergyConsumption", func() (float64, gonvml.Return) {
			mj, ret := h.GetTotalEnergyConsumption()
			return float64(mj), ret // mJ, as DCGM
		})
	}
	if fields.Has(telemetry.PCIeReplayCounter) {
		r.read(v, telemetry.PCIeReplayCounter, "nvmlDeviceGetPcieReplayCounter", func() (float64, gonvml.Return) {
			n, ret := h.GetPcieReplayCounter()
			return float64(n), ret
		})
	}
	if whole && (fields.Has(telemetry.GPUUtil) || fields.Has(telemetry.MemCopyUtil)) && !(r.skip.Has(telemetry.GPUUtil) && r.skip.Has(telemetry.MemCopyUtil)) {
		u, err := nvml.Call(r.lib, "nvmlDeviceGetUtilizationRates", h.GetUtilizationRates)
		switch {
		case err == nil:
			if fields.Has(telemetry.GPUUtil) {
				v.Set(telemetry.GPUUtil, float64(u.Gpu))
			}
			if fields.Has(telemetry.MemCopyUtil) {
				v.Set(telemetry.MemCopyUtil, float64(u.Memory))
			}
		case nvml.IsNotSupported(err):
			r.unsup = r.unsup.With(telemetry.GPUUtil).With(telemetry.MemCopyUtil)
		case r.err == nil:
			r.err = err
		}
	}
	if fields.Has(telemetry.EncUtil) {
		r.read(v, telemetry.EncUtil, "nvmlDeviceGetEncoderUtilization", func() (float64, gonvml.Return) {
			u, _, ret := h.GetEncoderUtilization()
			return float64(u), ret
		})
	}
	if fields.Has(telemetry.DecUtil) {
		r.read(v, telemetry.DecUtil, "nvmlDeviceGetDecoderUtilization", func() (float64, gonvml.Return) {
			u, _, ret := h.GetDecoderUtilization()
			return float64(u), ret
		})
	}
	ecc := []struct {
		f   telemetry.Field
		typ gonvml.MemoryErrorType
		ctr gonvml.EccCounterType
	}{
		{telemetry.ECCSBEVolatileTotal, gonvml.MEMORY_ERROR_TYPE_CORRECTED, gonvml.VOLATILE_ECC},
		{telemetry.ECCDBEVolatileTotal, gonvml.MEMORY_ERROR_TYPE_UNCORRECTED, gonvml.VOLATILE_ECC},
		{telemetry.ECCSBEAggregateTotal, gonvml.MEMORY_ERROR_TYPE_CORRECTED, gonvml.AGGREGATE_ECC},
		{telemetry.ECCDBEAggregateTotal, gonvml.MEMORY_ERROR_TYPE_UNCORRECTED, gonvml.AGGREGATE_ECC},
	}
	for _, e := range ecc {
		if fields.Has(e.f) {
			r.read(v, e.f, "nvmlDeviceGetTotalEccErrors", func() (float64, gonvml.Return) {
				n, ret := h.GetTotalEccErrors(e.typ, e.ctr)
				return float64(n), ret
			})
		}
	}
	rows := telemetry.MaskOf(telemetry.UncorrectableRemappedRows, telemetry.CorrectableRemappedRows, telemetry.RowRemapFailure)
	if fields&rows != 0 && r.skip&rows != rows && r.err == nil {
		type remap struct {
			corr, unc    int
			pending, bad bool
		}
		x, err := nvml.Call(r.lib, "nvmlDeviceGetRemappedRows", func() (remap, gonvml.Return) {
			c, u, p, f, ret := h.GetRemappedRows()
			return remap{c, u, p, f}, ret
		})
		switch {
		case err == nil:
			set := func(f telemetry.Field, val float64) {
				if fields.Has(f) {
					v.Set(f, val)
				}
			}
			set(telemetry.UncorrectableRemappedRows, float64(x.unc))
			set(telemetry.CorrectableRemappedRows, float64(x.corr))
			set(telemetry.RowRemapFailure, b2f(x.bad))
		case nvml.IsNotSupported(err):
			r.unsup |= rows
		default:
			r.err = err
		}
	}
	readNVLink(r, st, h, v, fields) // throughput.go
	if whole {
		readMemory(r, h, v, fields)
	}
}

// readMemory reads framebuffer fields, GPU or MIG device, in MiB.
func readMemory(r *reader, h gonvml.Device, v *telemetry.Values, fields telemetry.Mask) {
	fb := telemetry.MaskOf(telemetry.FBTotal, telemetry.FBFree, telemetry.FBUsed, telemetry.FBReserved)
	if fields&fb == 0 || r.skip&fb == fb || r.err != nil {
		return
	}
	// v2 reports reserved memory apart from used; v1 folds it into used on
	// drivers ≥ 510.
	m, err := nvml.Call(r.lib, "nvmlDeviceGetMemoryInfo_v2", h.GetMemoryInfo_v2)
	switch {
	case err == nil:
		mib := func(f telemetry.Field, bytes uint64) {
			if fields.Has(f) {
				v.Set(f, float64(bytes)/(1<<20))
			}
		}
		mib(telemetry.FBTotal, m.Total)
		mib(telemetry.FBFree, m.Free)
		mib(telemetry.FBUsed, m.Used)
		mib(telemetry.FBReserved, m.Reserved)
	case nvml.IsNotSupported(err):
		r.unsup |= fb
	default:
		r.err = err
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
