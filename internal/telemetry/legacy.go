package telemetry

// dcgm-exporter 1.x exported its metrics under lowercase names
// (dcgm_gpu_temp, …), and its 1.x compatibility counters file still lists
// them. DCGM resolves each to a field ID; this table holds those facts, so
// a 1.x file is served under its own names from the same fields as the
// DCGM_FI_* ones.
var legacyFieldIDs = map[string]uint16{
	"dcgm_sm_clock":                          100,
	"dcgm_memory_clock":                      101,
	"dcgm_memory_temp":                       140,
	"dcgm_gpu_temp":                          150,
	"dcgm_power_usage":                       155,
	"dcgm_total_energy_consumption":          156,
	"dcgm_pcie_tx_throughput":                200,
	"dcgm_pcie_rx_throughput":                201,
	"dcgm_pcie_replay_counter":               202,
	"dcgm_gpu_utilization":                   203,
	"dcgm_mem_copy_utilization":              204,
	"dcgm_enc_utilization":                   206,
	"dcgm_dec_utilization":                   207,
	"dcgm_xid_errors":                        230,
	"dcgm_power_violation":                   240,
	"dcgm_thermal_violation":                 241,
	"dcgm_sync_boost_violation":              242,
	"dcgm_board_limit_violation":             243,
	"dcgm_low_util_violation":                244,
	"dcgm_reliability_violation":             245,
	"dcgm_fb_free":                           251,
	"dcgm_fb_used":                           252,
	"dcgm_ecc_sbe_volatile_total":            310,
	"dcgm_ecc_dbe_volatile_total":            311,
	"dcgm_ecc_sbe_aggregate_total":           312,
	"dcgm_ecc_dbe_aggregate_total":           313,
	"dcgm_retired_pages_sbe":                 390,
	"dcgm_retired_pages_dbe":                 391,
	"dcgm_retired_pages_pending":             392,
	"dcgm_nvlink_flit_crc_error_count_total": 409,
	"dcgm_nvlink_data_crc_error_count_total": 419,
	"dcgm_nvlink_replay_error_count_total":   429,
	"dcgm_nvlink_recovery_error_count_total": 439,
	"dcgm_nvlink_bandwidth_total":            449,
	"dcgm_fi_prof_gr_engine_active":          1001,
	"dcgm_fi_prof_sm_active":                 1002,
	"dcgm_fi_prof_sm_occupancy":              1003,
	"dcgm_fi_prof_pipe_tensor_active":        1004,
	"dcgm_fi_prof_dram_active":               1005,
	"dcgm_fi_prof_pcie_tx_bytes":             1009,
	"dcgm_fi_prof_pcie_rx_bytes":             1010,
}

// lookupLegacyField resolves a 1.x name. known reports whether DCGM has
// the name at all; ok whether this daemon serves its field.
func lookupLegacyField(name string) (f Field, id uint16, known, ok bool) {
	id, known = legacyFieldIDs[name]
	if !known {
		return 0, 0, false, false
	}
	for f := range NumFields {
		if catalog[f].ID == id {
			return f, id, true, true
		}
	}
	return 0, id, true, false
}
