package health

// The NVML event set: arming it, waiting on it, and applying XID and
// double-bit ECC events to the units they hit.

import (
	"context"
	"fmt"
	"time"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"

	"github.com/gpu-plugin/gpu-plugin/internal/nvml"
)

// wantEvents reports whether any event can be fatal.
func (m *Monitor) wantEvents() bool { return m.eventMask() != 0 }

// eventMask is what the event set listens to: XIDs and double-bit ECC
// errors, both counted even when not fatal, as long as some event can be
// fatal at all.
func (m *Monitor) eventMask() uint64 {
	if !m.policy.anyXIDFatal() && !m.policy.ECCFatal() {
		return 0
	}
	return gonvml.EventTypeXidCriticalError | gonvml.EventTypeDoubleBitEccError
}

// arm creates the event set and registers every answering GPU on it; on
// failure the monitor probes instead and tries again after ArmRetry.
func (m *Monitor) arm() {
	m.disarm()
	mask := m.eventMask()
	defer func() { m.triedFor = m.wantedArmed() }()
	if mask == 0 {
		m.nextArm = time.Time{}
		m.setMode(ModeProbing, "no event type is fatal under the XID policy")
		return
	}
	lib := m.opts.Lib
	set, err := nvml.Call(lib, "nvmlEventSetCreate", lib.Interface().EventSetCreate)
	if err != nil {
		m.noteError("event_set_create", err)
		m.fallback(fmt.Sprintf("cannot create the NVML event set: %v", err))
		return
	}
	var registered []int
	var problems []string
	for i, w := range m.gpus {
		w.registered = false
		if w.handle == nil || !w.answering || w.noEvents != "" {
			continue
		}
		if err := m.register(w, set, mask); err != nil {
			if nvml.IsLost(err) {
				m.gpuLost(i, err)
				continue
			}
			if nvml.IsNotSupported(err) {
				w.noEvents = "events not supported: " + err.Error()
				continue
			}
			m.noteError("register_events", err)
			w.noEvents = err.Error()
			problems = append(problems, fmt.Sprintf("GPU %d: %v", w.index, err))
			continue
		}
		w.registered = true
		registered = append(registered, i)
	}
	if len(problems) > 0 {
		m.log.Warn("some GPUs cannot deliver health events; they are probed instead", "problems", problems)
	}
	if len(registered) == 0 {
		_ = nvml.Do(lib, "nvmlEventSetFree", set.Free)
		m.fallback("no GPU could be registered for events")
		m.armOnChange = true // try again as soon as a GPU answers
		return
	}
	m.set, m.armed, m.waitFails, m.nextArm, m.armOnChange = set, registered, 0, time.Time{}, false
	m.publish()
	m.setMode(ModeEvents, "")
}

func (m *Monitor) register(w *gpuWatch, set gonvml.EventSet, mask uint64) error {
	supported, err := nvml.Call(m.opts.Lib, "nvmlDeviceGetSupportedEventTypes", w.handle.GetSupportedEventTypes)
	if err != nil {
		return err
	}
	if mask&supported == 0 {
		return &nvml.Error{Op: "nvmlDeviceGetSupportedEventTypes", Return: gonvml.ERROR_NOT_SUPPORTED}
	}
	return nvml.Do(m.opts.Lib, "nvmlDeviceRegisterEvents", func() gonvml.Return {
		return w.handle.RegisterEvents(mask&supported, set)
	})
}

// disarm frees the event set.
func (m *Monitor) disarm() {
	if m.set == nil {
		return
	}
	_ = nvml.Do(m.opts.Lib, "nvmlEventSetFree", m.set.Free)
	m.set, m.armed = nil, nil
	for _, w := range m.gpus {
		w.registered = false
	}
}

// fallback switches to probing and schedules another try at events.
func (m *Monitor) fallback(reason string) {
	m.disarm()
	m.publish()
	m.nextArm = time.Now().Add(m.opts.ArmRetry)
	if m.mode() != ModeProbing {
		m.log.Warn("health events unavailable: probing every GPU instead", "reason", reason,
			"probeInterval", m.opts.ProbeInterval, "retryEventsIn", m.opts.ArmRetry)
	}
	m.setMode(ModeProbing, reason)
}

// waitOnce waits for one event. A timeout is the normal idle answer.
func (m *Monitor) waitOnce(ctx context.Context, timeout time.Duration) {
	type result struct {
		ev      gonvml.EventData
		timeout bool
	}
	set := m.set
	ms := uint32(max(timeout.Milliseconds(), 1))
	r, err := nvml.Call(m.opts.Lib, "nvmlEventSetWait", func() (result, gonvml.Return) {
		ev, ret := set.Wait(ms)
		if ret == gonvml.ERROR_TIMEOUT {
			return result{timeout: true}, gonvml.SUCCESS
		}
		return result{ev: ev}, ret
	})
	switch {
	case err == nil && r.timeout:
		m.waitFails = 0
	case err == nil:
		m.waitFails = 0
		m.handle(r.ev)
	default:
		m.waitFailed(ctx, err)
	}
}

// waitFailed handles a failed wait: find the GPU at fault by probing, and
// after maxWaitFailures in a row give up on events for a while. It never
// spins: every failure that does not re-arm backs off.
func (m *Monitor) waitFailed(ctx context.Context, err error) {
	m.waitFails++
	m.noteError("event_wait", err)
	m.mu.Lock()
	m.st.WaitErrors++
	m.mu.Unlock()
	if m.waitFails == 1 {
		m.log.Warn("health event wait failed", "err", err)
	}
	armed := m.set
	if nvml.IsLost(err) {
		m.probeRound() // names the lost GPU and re-arms without it
	}
	if m.set != armed {
		return
	}
	if m.waitFails >= maxWaitFailures {
		m.fallback(fmt.Sprintf("event wait failed %d times in a row: %v", m.waitFails, err))
		return
	}
	sleep(ctx, min(50*time.Millisecond<<m.waitFails, m.opts.ProbeInterval))
}

// handle applies one event.
func (m *Monitor) handle(ev gonvml.EventData) {
	m.mu.Lock()
	m.st.Events++
	m.mu.Unlock()
	i, ok := m.byHandle[ev.Device]
	if !ok {
		i, ok = m.lookupDevice(ev.Device)
	}
	if !ok {
		m.noteError("unknown_device_event", fmt.Errorf("event type %#x data %d for a device not in the inventory", ev.EventType, ev.EventData))
		return
	}
	w := m.gpus[i]
	switch {
	case ev.EventType&gonvml.EventTypeXidCriticalError != 0:
		code := ev.EventData
		m.countXID(w.index, code)
		if !m.policy.XIDFatal(code) {
			return
		}
		if code == XIDLost {
			w.answering = false
			if w.uuid != "" {
				m.fault(w.uuid, i, XIDReason(code))
			}
			return
		}
		m.faultUnits(i, ev, XIDReason(code))
	case ev.EventType&gonvml.EventTypeDoubleBitEccError != 0:
		m.mu.Lock()
		m.dbe[w.index]++
		m.mu.Unlock()
		if m.policy.ECCFatal() {
			m.faultUnits(i, ev, "double-bit ECC error (uncorrectable memory error)")
		}
	}
}

// lookupDevice maps an event's device that is not a known handle (a MIG
// handle, a handle NVML re-created) to a GPU by UUID.
func (m *Monitor) lookupDevice(d gonvml.Device) (int, bool) {
	if d == nil {
		return 0, false
	}
	uuid, err := nvml.Call(m.opts.Lib, "nvmlDeviceGetUUID", d.GetUUID)
	if err != nil {
		return 0, false
	}
	return m.gpuOfUnit(uuid)
}

// faultUnits marks what an event hits: the MIG devices whose GPU and
// compute instance IDs match, or the whole GPU (which covers every replica
// and MIG device on it) when the event names no instance or none matches.
func (m *Monitor) faultUnits(i int, ev gonvml.EventData, reason string) {
	w := m.gpus[i]
	if ev.GpuInstanceId != noInstance {
		hit := false
		for _, mig := range w.migs {
			if uint32(mig.GPUInstanceID) == ev.GpuInstanceId &&
				(ev.ComputeInstanceId == noInstance || uint32(mig.ComputeInstanceID) == ev.ComputeInstanceId) {
				m.fault(mig.UUID, i, fmt.Sprintf("%s on MIG GI %d CI %d", reason, mig.GPUInstanceID, mig.ComputeInstanceID))
				hit = true
			}
		}
		if hit {
			return
		}
	}
	if w.uuid != "" {
		m.fault(w.uuid, i, reason)
	}
}

func (m *Monitor) wantedArmed() []int {
	var out []int
	for i, w := range m.gpus {
		if w.handle != nil && w.answering && w.noEvents == "" {
			out = append(out, i)
		}
	}
	return out
}
