// Command gen-static regenerates deployments/static/*.yaml from the Helm
// chart (`make manifests`).
package main

import (
	"fmt"
	"os"
	"sort"

	"github.com/gpu-plugin/gpu-plugin/tests/deploy"
)

func main() {
	written, err := deploy.WriteStatic(deploy.RepoRoot())
	if err != nil {
		fmt.Fprintln(os.Stderr, "gen-static:", err)
		os.Exit(1)
	}
	sort.Strings(written)
	for _, f := range written {
		fmt.Println("wrote", f)
	}
}
