// A small Benthos 4.27.0 distribution for the benchmark's peer (bench/benthos.yaml):
// only the components that configuration needs. Built by scripts/benthos.sh.
package main

import (
	"context"

	"github.com/benthosdev/benthos/v4/public/service"

	_ "github.com/benthosdev/benthos/v4/public/components/io"
	_ "github.com/benthosdev/benthos/v4/public/components/kafka"
	_ "github.com/benthosdev/benthos/v4/public/components/prometheus"
	_ "github.com/benthosdev/benthos/v4/public/components/pure"
)

func main() {
	service.RunCLI(context.Background())
}
