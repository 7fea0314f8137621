package sim

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
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
//	                                    temperature_c, power_w, sm_clock_mhz (all optional)
//	POST /sim/gpus/{index}/fault?call=GetTemperature&error=UNKNOWN
//	                                    that NVML device call fails (call=* for all;
//	                                    error=SUCCESS clears)
func (n *Node) Handler() http.Handler {
	mux := http.NewServeMux()
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
			return nil, badRequest("telemetry body: %v (fields: gpu_util, mem_copy_util, fb_used_mib, temperature_c, power_w, sm_clock_mhz)", err)
		}
		if err := n.SetTelemetry(gpu, p); err != nil {
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
		return map[string]any{"gpu": gpu, "call": call, "error": code.Error()}, n.SetFault(gpu, call, code)
	}))
	return mux
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
