#include "green_split.h"

#define GREEN_MAX_PARTS 64

int ep_test_green_split(int device, int parts, CUcontext *out, unsigned *sms_each) {
    CUdevice dev;
    CUdevResource all, split[GREEN_MAX_PARTS], rest;
    if (parts < 1 || parts > GREEN_MAX_PARTS || cuInit(0) != CUDA_SUCCESS ||
        cuDeviceGet(&dev, device) != CUDA_SUCCESS ||
        cuDeviceGetDevResource(dev, &all, CU_DEV_RESOURCE_TYPE_SM) != CUDA_SUCCESS)
        return -1;
    unsigned align = all.sm.smCoscheduledAlignment ? all.sm.smCoscheduledAlignment : 1;
    unsigned each = all.sm.smCount / (unsigned)parts / align * align;
    if (each < all.sm.minSmPartitionSize)
        return -1;
    unsigned n = (unsigned)parts;
    if (cuDevSmResourceSplitByCount(split, &n, &all, &rest, 0, each) != CUDA_SUCCESS || n < (unsigned)parts)
        return -1;
    for (int i = 0; i < parts; i++) {
        CUdevResourceDesc desc;
        CUgreenCtx green;
        if (cuDevResourceGenerateDesc(&desc, &split[i], 1) != CUDA_SUCCESS ||
            cuGreenCtxCreate(&green, desc, dev, CU_GREEN_CTX_DEFAULT_STREAM) != CUDA_SUCCESS ||
            cuCtxFromGreenCtx(&out[i], green) != CUDA_SUCCESS)
            return -1;
    }
    if (sms_each != NULL)
        *sms_each = each;
    return 0;
}
