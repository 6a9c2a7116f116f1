// A node-opcua server standing in for a PLC in test_opcua_nodeopcua.py (an OPC UA stack
// independent of asyncua). One JSON argument:
//   {port, namespace, extraNamespaces?: [uri], wave?: {periodMs, len},
//    pki?: {root, cert, key}}   // pki: Basic256Sha256 SignAndEncrypt only, no auto-accept,
//                               // user edge / s3cret, rejected client certs in root/rejected
// Prints "READY <endpoint>" once listening; shuts down when stdin closes.
"use strict";
const {
  OPCUAServer, OPCUACertificateManager, Variant, DataType, VariantArrayType, StatusCodes,
  SecurityPolicy, MessageSecurityMode,
} = require("node-opcua");

async function main() {
  const cfg = JSON.parse(process.argv[2]);
  const options = {
    port: cfg.port,
    resourcePath: "/uns",
    buildInfo: { productName: "uns test node-opcua PLC" },
    serverInfo: { applicationUri: "urn:uns:test:node-opcua-plc" },
  };
  if (cfg.pki) {
    const cm = new OPCUACertificateManager({
      rootFolder: cfg.pki.root,
      automaticallyAcceptUnknownCertificate: false,
    });
    await cm.initialize();
    options.serverCertificateManager = cm;
    options.certificateFile = cfg.pki.cert;
    options.privateKeyFile = cfg.pki.key;
    options.securityPolicies = [SecurityPolicy.Basic256Sha256];
    options.securityModes = [MessageSecurityMode.SignAndEncrypt];
    options.allowAnonymous = false;
    options.userManager = { isValidUser: (user, password) => user === "edge" && password === "s3cret" };
  }
  const server = new OPCUAServer(options);
  await server.initialize();
  const addressSpace = server.engine.addressSpace;
  for (const uri of cfg.extraNamespaces || []) addressSpace.registerNamespace(uri);
  const ns = addressSpace.registerNamespace(cfg.namespace);
  const press = ns.addObject({
    organizedBy: addressSpace.rootFolder.objects, browseName: "Press01", nodeId: "s=Press01",
  });
  const temp = ns.addVariable({
    componentOf: press, browseName: "BearingTemp", nodeId: "s=Press01.BearingTemp",
    dataType: "Double", minimumSamplingInterval: 0,
    value: new Variant({ dataType: DataType.Double, value: 20.0 }),
  });
  const wave = cfg.wave || { periodMs: 0, len: 256 };
  const waveVar = ns.addVariable({
    componentOf: press, browseName: "Vibration", nodeId: "s=Press01.Vibration",
    dataType: "Float", valueRank: 1, arrayDimensions: [wave.len], minimumSamplingInterval: 0,
    value: new Variant({
      dataType: DataType.Float, arrayType: VariantArrayType.Array, value: new Float32Array(wave.len),
    }),
  });
  await server.start();

  let t = 20.0;
  setInterval(() => {
    t += 0.25;
    temp.setValueFromSource(new Variant({ dataType: DataType.Double, value: t }));
  }, 100);

  if (wave.periodMs > 0) {
    // Back-to-back blocks on a timer, the way a PLC task copies its sample buffer: block k
    // has t0 = start + k*period and first value k*1000 (so a test can tell which arrived).
    // One block per tick, the next tick a period later even when this one was late: on a
    // loaded machine a catch-up burst would be coalesced by the server, a loss no PLC makes.
    const start = Date.now();
    let k = 0;
    const tick = () => {
      const values = new Float32Array(wave.len);
      for (let i = 0; i < wave.len; i++) values[i] = k * 1000 + i;
      waveVar.setValueFromSource(
        new Variant({ dataType: DataType.Float, arrayType: VariantArrayType.Array, value: values }),
        StatusCodes.Good,
        new Date(start + k * wave.periodMs),
      );
      k += 1;
      setTimeout(tick, wave.periodMs);
    };
    setTimeout(tick, wave.periodMs);
  }
  console.log("READY " + server.getEndpointUrl());
  process.stdin.on("end", async () => {
    await server.shutdown(0);
    process.exit(0);
  });
  process.stdin.resume();
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
