package faults

import (
	"testing"

	"github.com/dkimgw/dkimgw/testenv"
)

func TestMain(m *testing.M) { testenv.Main(m) }
