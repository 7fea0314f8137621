// Package version reports the build's version, set at link time:
//
//	go build -ldflags "-X github.com/gpu-plugin/gpu-plugin/internal/version.version=v1.2.3"
package version

import "runtime/debug"

// version is written by the linker; it is never assigned at run time.
var version = ""

// String is the build's version: the linker-injected one, else the module
// version Go recorded, else "devel".
func String() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "devel"
}
