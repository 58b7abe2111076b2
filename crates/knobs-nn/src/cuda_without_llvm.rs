//! The `cuda` build without LLVM. cubecl-cuda compiles kernels either as CUDA C++ through
//! NVRTC (NVIDIA's run-time compiler, part of the CUDA toolkit) or through its own LLVM
//! backend, and links both. That backend's build downloads an LLVM 23 bundle from GitHub, which
//! an offline machine cannot do, so the workspace skips it (`DOCS_RS` in `.cargo/config.toml`,
//! the switch cubecl-llvm's build script honours) and turns on cubecl-cuda's `cpp` feature,
//! which makes NVRTC the compiler every kernel takes. The LLVM functions the unused backend
//! still names are defined here so the executable links; none is ever called, and one that
//! were would stop the process naming itself rather than jump to address zero.

fn missing(name: &str) -> ! {
    eprintln!("knobs: `{name}` belongs to cubecl's LLVM backend, which this `cuda` build leaves out (kernels compile through NVRTC)");
    std::process::abort()
}

macro_rules! absent {
    ($($name:ident),* $(,)?) => { $(
        #[unsafe(no_mangle)]
        pub extern "C" fn $name() -> ! {
            missing(stringify!($name))
        }
    )* };
}

// Listed from the undefined symbols of a link without them (cubecl 0.11.3, burn 0.22.1).
absent!(
    LLVMAddAttributeAtIndex, LLVMAddCallSiteAttribute, LLVMAddCase, LLVMAddDestination,
    LLVMAddFunction, LLVMAddGlobalInAddressSpace, LLVMAddIncoming, LLVMAddNamedMetadataOperand,
    LLVMAppendBasicBlockInContext, LLVMArrayType2, LLVMBFloatTypeInContext, LLVMBlockAddress,
    LLVMBuildAShr, LLVMBuildAdd, LLVMBuildAddrSpaceCast, LLVMBuildAlloca,
    LLVMBuildAnd, LLVMBuildArrayAlloca, LLVMBuildAtomicCmpXchgSyncScope, LLVMBuildAtomicRMWSyncScope,
    LLVMBuildBitCast, LLVMBuildBr, LLVMBuildCall2, LLVMBuildCondBr,
    LLVMBuildExtractElement, LLVMBuildExtractValue, LLVMBuildFAdd, LLVMBuildFCmp,
    LLVMBuildFDiv, LLVMBuildFMul, LLVMBuildFNeg, LLVMBuildFPExt,
    LLVMBuildFPToSI, LLVMBuildFPToUI, LLVMBuildFPTrunc, LLVMBuildFRem,
    LLVMBuildFSub, LLVMBuildFenceSyncScope, LLVMBuildFreeze, LLVMBuildGEPWithNoWrapFlags,
    LLVMBuildICmp, LLVMBuildIndirectBr, LLVMBuildInsertElement, LLVMBuildInsertValue,
    LLVMBuildIntToPtr, LLVMBuildLShr, LLVMBuildLoad2, LLVMBuildMul,
    LLVMBuildOr, LLVMBuildPhi, LLVMBuildPtrToInt, LLVMBuildRet,
    LLVMBuildRetVoid, LLVMBuildSDiv, LLVMBuildSExt, LLVMBuildSIToFP,
    LLVMBuildSRem, LLVMBuildSelect, LLVMBuildShl, LLVMBuildShuffleVector,
    LLVMBuildStore, LLVMBuildStructGEP2, LLVMBuildSub, LLVMBuildSwitch,
    LLVMBuildTrunc, LLVMBuildUDiv, LLVMBuildUIToFP, LLVMBuildURem,
    LLVMBuildUnreachable, LLVMBuildVAArg, LLVMBuildXor, LLVMBuildZExt,
    LLVMCanValueUseFastMathFlags, LLVMClearInsertionPosition, LLVMConstArray2, LLVMConstInt,
    LLVMConstNamedStruct, LLVMConstNull, LLVMConstPointerNull, LLVMConstReal,
    LLVMConstStringInContext2, LLVMConstVector, LLVMContextCreate, LLVMContextDispose,
    LLVMCountParamTypes, LLVMCountParams, LLVMCreateBuilderInContext, LLVMCreateEnumAttribute,
    LLVMCreateMemoryBufferWithMemoryRangeCopy, LLVMCreatePassBuilderOptions, LLVMCreateStringAttribute, LLVMCreateTargetDataLayout,
    LLVMCreateTargetMachine, LLVMCreateTypeAttribute, LLVMDeleteFunction, LLVMDeleteGlobal,
    LLVMDisposeBuilder, LLVMDisposeErrorMessage, LLVMDisposeMemoryBuffer, LLVMDisposeMessage,
    LLVMDisposeModule, LLVMDisposePassBuilderOptions, LLVMDisposeTargetData, LLVMDisposeTargetMachine,
    LLVMDoubleTypeInContext, LLVMFloatTypeInContext, LLVMFunctionType, LLVMGetBufferSize,
    LLVMGetBufferStart, LLVMGetDefaultTargetTriple, LLVMGetElementType, LLVMGetEnumAttributeKindForName,
    LLVMGetErrorMessage, LLVMGetFirstBasicBlock, LLVMGetFirstFunction, LLVMGetFirstInstruction,
    LLVMGetFirstUse, LLVMGetHostCPUFeatures, LLVMGetHostCPUName, LLVMGetInlineAsm,
    LLVMGetInsertBlock, LLVMGetIntTypeWidth, LLVMGetLastEnumAttributeKind, LLVMGetMDKindIDInContext,
    LLVMGetMetadataKind, LLVMGetModuleContext, LLVMGetNamedFunction, LLVMGetNextFunction,
    LLVMGetNextInstruction, LLVMGetNextUse, LLVMGetNumArgOperands, LLVMGetOperand,
    LLVMGetParam, LLVMGetParamTypes, LLVMGetPointerAddressSpace, LLVMGetPoison,
    LLVMGetReturnType, LLVMGetSyncScopeID, LLVMGetTargetFromTriple, LLVMGetTypeContext,
    LLVMGetTypeKind, LLVMGetUndef, LLVMGetUser, LLVMGetValueName2,
    LLVMGetVectorSize, LLVMGlobalGetValueType, LLVMGlobalSetMetadata, LLVMHalfTypeInContext,
    LLVMInitializeNVPTXAsmPrinter, LLVMInitializeNVPTXTarget, LLVMInitializeNVPTXTargetInfo, LLVMInitializeNVPTXTargetMC,
    LLVMInstructionEraseFromParent, LLVMInt32TypeInContext, LLVMInt8TypeInContext, LLVMIntTypeInContext,
    LLVMIsAAllocaInst, LLVMIsAAtomicRMWInst, LLVMIsACallInst, LLVMIsAConstant,
    LLVMIsAConstantInt, LLVMIsAFenceInst, LLVMIsAFunction, LLVMIsAGlobalObject,
    LLVMIsAGlobalValue, LLVMIsAGlobalVariable, LLVMIsAIndirectBrInst, LLVMIsAInstruction,
    LLVMIsAInvokeInst, LLVMIsALoadInst, LLVMIsAMDNode, LLVMIsAPHINode,
    LLVMIsAStoreInst, LLVMIsASwitchInst, LLVMIsAUIToFPInst, LLVMIsAZExtInst,
    LLVMIsAtomic, LLVMLookupIntrinsicID, LLVMMDNodeInContext2, LLVMMDStringInContext2,
    LLVMMetadataAsValue, LLVMMetadataReplaceAllUsesWith, LLVMModuleCreateWithNameInContext, LLVMOrcCreateLLJIT,
    LLVMOrcCreateNewThreadSafeContextFromLLVMContext, LLVMOrcCreateNewThreadSafeModule, LLVMOrcDisposeLLJIT, LLVMOrcDisposeThreadSafeContext,
    LLVMOrcLLJITAddLLVMIRModule, LLVMOrcLLJITGetMainJITDylib, LLVMOrcLLJITLookup, LLVMParseIRInContext2,
    LLVMPointerTypeInContext, LLVMPositionBuilderAtEnd, LLVMPositionBuilderBefore, LLVMPrintModuleToString,
    LLVMPrintTypeToString, LLVMReplaceAllUsesWith, LLVMRunPasses, LLVMScalableVectorType,
    LLVMSetAlignment, LLVMSetAtomicSyncScopeID, LLVMSetDataLayout, LLVMSetFastMathFlags,
    LLVMSetFunctionCallConv, LLVMSetGlobalConstant, LLVMSetInitializer, LLVMSetLinkage,
    LLVMSetMetadata, LLVMSetModuleDataLayout, LLVMSetNNeg, LLVMSetOrdering,
    LLVMSetTarget, LLVMSetVolatile, LLVMStructCreateNamed, LLVMStructSetBody,
    LLVMStructTypeInContext, LLVMTargetMachineEmitToMemoryBuffer, LLVMTemporaryMDNode, LLVMTypeIsSized,
    LLVMTypeOf, LLVMValueAsMetadata, LLVMVectorType, LLVMVoidTypeInContext,
    LLVM_InitializeNativeAsmParser, LLVM_InitializeNativeAsmPrinter, LLVM_InitializeNativeDisassembler, LLVM_InitializeNativeTarget,
    cubecl_free_message, cubecl_link_device_bitcode, cubecl_set_llvm_option,
);
