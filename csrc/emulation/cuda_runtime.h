// The emulation build's <cuda_runtime.h>: the shim (this folder is first on its include path).
#pragma once
#include "reco_emu.h"
