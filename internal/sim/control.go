package sim

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"reflect"
	"strconv"
	"strings"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
)

// Handler serves the control API under /sim/. It exists only with
// --simulate; every injection travels through the simulated NVML, so the
// daemon's health and telemetry code sees it exactly as it would see the
// driver's.
//
//	GET  /sim/gpus                      every GPU's simulated state
//	POST /sim/gpus/{index}/xid?code=N   an XID event (optional gi=, ci= for a MIG instance)
//	POST /sim/gpus/{index}/lost         the GPU falls off the bus
//	POST /sim/gpus/{index}/recover      the GPU is back
//	PUT  /sim/gpus/{index}/telemetry    JSON: gpu_util, mem_copy_util, fb_used_mib,
//	                                    temperature_c, power_w, sm_clock_mhz, memory_temp_c,
//	                                    enc_util, dec_util, pcie_replays, gr_engine_active,
//	                                    sm_active, sm_occupancy, tensor_active, dram_active
//	                                    (all optional; the GPM ones in percent),
//	                                    pcie_tx_kbps, pcie_rx_kbps (unset: NOT_SUPPORTED),
//	                                    nvlink_tx_kib, nvlink_rx_kib (counters, all links)
//	PUT  /sim/gpus/{index}/mig         JSON {"enabled": true, "devices": ["3g.20gb", "3g.20gb"]}:
//	                                    re-partition the GPU (enabled defaults to devices ≠ [])
//	POST /sim/gpus/{index}/fault?call=GetTemperature&error=UNKNOWN
//	                                    that NVML device call fails (call=* for all;
//	                                    error=SUCCESS clears)
//	POST /sim/gpus/{index}/ecc?type=double  an ECC event (type=single|double, default double;
//	                                    optional gi=, ci=)
//	POST /sim/fault?call=EventSetCreate&error=UNKNOWN
//	                                    a library-level call fails: EventSetCreate, or
//	                                    EventSetWait on every event set (error=SUCCESS clears)
//	POST /sim/events/wait-lost?on=true  event waits fail with GPU_IS_LOST while a GPU
//	                                    registered on the set is lost
//	POST /sim/gpus/{index}/recovery?action=gpu_reset
//	                                    NVML's recovery action field (recovery.go)
//	POST /sim/gpus/{index}/remap?corr=0&uncorr=1&pending=true&failure=false
//	                                    the row-remapper state (recovery.go)
//	POST /sim/gpus/{index}/ecc-errors?sbe=N&dbe=N[&agg_sbe=N&agg_dbe=N][&enabled=false]
//	                                    ECC error totals and mode (ecc.go)
//	PUT  /sim/gpus/{index}/processes    JSON [{"pid": 4242, "used_mib": 2048, "sm_util": 40,
//	                                    "mem_util": 5, "mig": "<MIG UUID or GPU instance ID>", "mps": false}]:
//	                                    replace the GPU's compute processes and MPS clients (processes.go)
//	GET  /sim/gpus/{index}/processes    the GPU's compute processes
func (n *Node) Handler() http.Handler {
	mux := http.NewServeMux()
	n.addRecoveryHandlers(mux)
	n.addECCHandlers(mux)
	n.addProcessHandlers(mux)
	mux.HandleFunc("GET /sim/gpus", func(w http.ResponseWriter, r *http.Request) {
		reply(w, http.StatusOK, n.State())
	})
	mux.HandleFunc("POST /sim/gpus/{index}/xid", n.gpuHandler(func(gpu int, r *http.Request) (any, error) {
		code, err := queryInt(r, "code", -1)
		if err != nil || code < 0 {
			return nil, badRequest("xid needs ?code=N with N a non-negative XID number")
		}
		gi, err1 := queryInt(r, "gi", -1)
		ci, err2 := queryInt(r, "ci", -1)
		if err1 != nil || err2 != nil {
			return nil, badRequest("gi and ci must be non-negative integers (MIG GPU / compute instance IDs)")
		}
		delivered, err := n.InjectXID(gpu, uint64(code), gi, ci)
		return map[string]any{"gpu": gpu, "xid": code, "delivered": delivered}, err
	}))
	mux.HandleFunc("POST /sim/gpus/{index}/lost", n.gpuHandler(func(gpu int, _ *http.Request) (any, error) {
		return map[string]any{"gpu": gpu, "lost": true}, n.SetLost(gpu, true)
	}))
	mux.HandleFunc("POST /sim/gpus/{index}/recover", n.gpuHandler(func(gpu int, _ *http.Request) (any, error) {
		return map[string]any{"gpu": gpu, "lost": false}, n.SetLost(gpu, false)
	}))
	mux.HandleFunc("PUT /sim/gpus/{index}/telemetry", n.gpuHandler(func(gpu int, r *http.Request) (any, error) {
		var p TelemetryPatch
		dec := json.NewDecoder(io.LimitReader(r.Body, 64<<10))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&p); err != nil {
			return nil, badRequest("telemetry body: %v (fields: %s)", err, TelemetryFields)
		}
		if err := n.SetTelemetry(gpu, p); err != nil {
			return nil, badRequest("%v", err)
		}
		return n.State()[gpu], nil
	}))
	mux.HandleFunc("PUT /sim/gpus/{index}/mig", n.gpuHandler(func(gpu int, r *http.Request) (any, error) {
		var body struct {
			Enabled *bool    `json:"enabled"`
			Devices []string `json:"devices"`
		}
		dec := json.NewDecoder(io.LimitReader(r.Body, 64<<10))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&body); err != nil {
			return nil, badRequest("mig body: %v (fields: enabled, devices, e.g. {\"devices\": [\"3g.20gb\", \"3g.20gb\"]})", err)
		}
		enabled := len(body.Devices) > 0
		if body.Enabled != nil {
			enabled = *body.Enabled
		}
		if err := n.SetMIGLayout(gpu, enabled, body.Devices); err != nil {
			return nil, badRequest("%v", err)
		}
		return n.State()[gpu], nil
	}))
	mux.HandleFunc("POST /sim/gpus/{index}/fault", n.gpuHandler(func(gpu int, r *http.Request) (any, error) {
		call := r.URL.Query().Get("call")
		code, ok := returnCodes[strings.ToUpper(strings.TrimPrefix(r.URL.Query().Get("error"), "ERROR_"))]
		if call == "" || !ok {
			return nil, badRequest("fault needs ?call=<device method, e.g. GetTemperature, or *>&error=<UNKNOWN|GPU_IS_LOST|TIMEOUT|NOT_SUPPORTED|SUCCESS>")
		}
		if !faultCall(call) {
			return nil, badRequest("no NVML call %q to fail: want a method of go-nvml's Device (e.g. GetTemperature), GpuInstance or ComputeInstance (e.g. GpuInstanceGetInfo), or *", call)
		}
		return map[string]any{"gpu": gpu, "call": call, "error": code.Error()}, n.SetFault(gpu, call, code)
	}))
	mux.HandleFunc("POST /sim/gpus/{index}/ecc", n.gpuHandler(func(gpu int, r *http.Request) (any, error) {
		var eventType uint64
		switch t := r.URL.Query().Get("type"); t {
		case "", "double":
			eventType = gonvml.EventTypeDoubleBitEccError
		case "single":
			eventType = gonvml.EventTypeSingleBitEccError
		default:
			return nil, badRequest("ecc type %q: want single or double", t)
		}
		gi, err1 := queryInt(r, "gi", -1)
		ci, err2 := queryInt(r, "ci", -1)
		if err1 != nil || err2 != nil {
			return nil, badRequest("gi and ci must be non-negative integers (MIG GPU / compute instance IDs)")
		}
		delivered, err := n.InjectEvent(gpu, eventType, 0, gi, ci)
		return map[string]any{"gpu": gpu, "eventType": eventType, "delivered": delivered}, err
	}))
	mux.HandleFunc("POST /sim/fault", func(w http.ResponseWriter, r *http.Request) {
		call := r.URL.Query().Get("call")
		code, ok := returnCodes[strings.ToUpper(strings.TrimPrefix(r.URL.Query().Get("error"), "ERROR_"))]
		if !ok {
			reply(w, http.StatusBadRequest, map[string]string{"error": "fault needs ?call=<" + strings.Join(LibraryFaultCalls, "|") +
				">&error=<UNKNOWN|GPU_IS_LOST|TIMEOUT|NOT_SUPPORTED|SUCCESS>"})
			return
		}
		if err := n.SetLibraryFault(call, code); err != nil {
			reply(w, http.StatusBadRequest, map[string]string{"error": err.Error()})
			return
		}
		reply(w, http.StatusOK, map[string]any{"call": call, "error": code.Error()})
	})
	mux.HandleFunc("POST /sim/events/wait-lost", func(w http.ResponseWriter, r *http.Request) {
		on, err := strconv.ParseBool(r.URL.Query().Get("on"))
		if err != nil {
			reply(w, http.StatusBadRequest, map[string]string{"error": "wait-lost needs ?on=true or ?on=false"})
			return
		}
		n.SetWaitLost(on)
		reply(w, http.StatusOK, map[string]any{"waitLost": on})
	})
	return mux
}

// faultCall reports whether call names a simulated call a fault can fail:
// a Device method, a GpuInstance or ComputeInstance method with that
// prefix, or "*". A typo would otherwise be stored and never fire.
func faultCall(call string) bool {
	if call == "*" {
		return true
	}
	if _, ok := reflect.TypeFor[gonvml.Device]().MethodByName(call); ok {
		return true
	}
	if m, ok := strings.CutPrefix(call, "GpuInstance"); ok {
		_, ok = reflect.TypeFor[gonvml.GpuInstance]().MethodByName(m)
		return ok
	}
	if m, ok := strings.CutPrefix(call, "ComputeInstance"); ok {
		_, ok = reflect.TypeFor[gonvml.ComputeInstance]().MethodByName(m)
		return ok
	}
	return false
}

var returnCodes = map[string]gonvml.Return{
	"SUCCESS": gonvml.SUCCESS, "UNKNOWN": gonvml.ERROR_UNKNOWN, "GPU_IS_LOST": gonvml.ERROR_GPU_IS_LOST,
	"TIMEOUT": gonvml.ERROR_TIMEOUT, "NOT_SUPPORTED": gonvml.ERROR_NOT_SUPPORTED,
}

type httpError struct {
	status int
	msg    string
}

func (e *httpError) Error() string { return e.msg }

func badRequest(format string, args ...any) error {
	return &httpError{status: http.StatusBadRequest, msg: fmt.Sprintf(format, args...)}
}

func (n *Node) gpuHandler(f func(gpu int, r *http.Request) (any, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		gpu, err := strconv.Atoi(r.PathValue("index"))
		if err == nil {
			err = n.validGPU(gpu)
		}
		if err != nil {
			reply(w, http.StatusNotFound, map[string]string{"error": fmt.Sprintf("bad GPU index %q: this node has GPUs 0..%d", r.PathValue("index"), n.GPUCount()-1)})
			return
		}
		body, err := f(gpu, r)
		if err != nil {
			status := http.StatusInternalServerError
			var he *httpError
			if errors.As(err, &he) {
				status = he.status
			}
			reply(w, status, map[string]string{"error": err.Error()})
			return
		}
		reply(w, http.StatusOK, body)
	}
}

func queryInt(r *http.Request, key string, def int) (int, error) {
	s := r.URL.Query().Get(key)
	if s == "" {
		return def, nil
	}
	v, err := strconv.ParseInt(s, 0, 64)
	if err != nil || v < 0 || v > 1<<32-1 {
		return def, fmt.Errorf("bad %s %q", key, s)
	}
	return int(v), nil
}

func reply(w http.ResponseWriter, status int, body any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(body)
}
