package miroir.peer;

import java.io.IOException;
import java.lang.management.GarbageCollectorMXBean;
import java.lang.management.ManagementFactory;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.HashMap;
import java.util.Map;
import java.util.Properties;
import java.util.TreeMap;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.FeatureUpdate;
import org.apache.kafka.clients.admin.FinalizedVersionRange;
import org.apache.kafka.clients.admin.UpdateFeaturesOptions;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.KeyValue;
import org.apache.kafka.streams.StoreQueryParameters;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.state.KeyValueIterator;
import org.apache.kafka.streams.state.QueryableStoreTypes;
import org.apache.kafka.streams.state.ReadOnlyKeyValueStore;

/**
 * Runs the peer and reports what it cost, for benches/kafka_streams.rs.
 *
 * <pre>
 * java -jar peer.jar tables brokers=HOST:PORT app=ID users=TOPIC departments=TOPIC \
 *     [warm-users=TOPIC warm-departments=TOPIC] [updates=N] [deadline-minutes=N]
 * </pre>
 *
 * java -jar peer.jar commands brokers=HOST:PORT app=ID users=TOPIC commands=TOPIC secret=HS256-SECRET \
 *     [commit-interval-ms=N poll-ms=N]
 * </pre>
 *
 * `tables` first runs the tables over the warm-up topics (JIT and caches warm, its own
 * application id), then over the measured topics until every partition it reads is committed
 * at its end, and prints `RESULT seconds cpu-seconds jit-seconds gc-seconds peak-rss-mib`, then
 * each table's row count (`ROWS table n`) and each department's counts (`COUNT name users
 * active`). With `updates`, it then prints `LOADED`, waits for a line on its standard input
 * (the benchmark has published the updates), runs until caught up again and prints `UPDATED
 * seconds cpu-seconds`. A run not caught up within `deadline-minutes` (30) prints `STOPPED
 * reason` and exits with status 3.
 *
 * `commands` runs the `UpdateUserEmail` processor with Kafka Streams' defaults but for
 * exactly-once v2 (and the commit interval and poll time, when given), prints `READY` once it runs, and stops when its standard input closes.
 *
 * <pre>
 * java -jar peer.jar transaction-version brokers=HOST:PORT version=N
 * </pre>
 *
 * `transaction-version` sets the cluster's `transaction.version` feature to N (1: the
 * transaction protocol every client speaks; 2: KIP-890's, which the Java client of Kafka 4
 * uses and librdkafka does not) and prints `PREVIOUS level`, the level it had.
 */
public final class Main {
    private Main() {}

    public static void main(String[] args) throws Exception {
        Map<String, String> options = new HashMap<>();
        for (int i = 1; i < args.length; i++) {
            String[] kv = args[i].split("=", 2);
            options.put(kv[0], kv.length > 1 ? kv[1] : "");
        }
        String mode = args.length == 0 ? "" : args[0];
        deadlineNanos = Long.parseLong(options.getOrDefault("deadline-minutes", "30")) * 60_000_000_000L;
        // The JVM exits here whatever happened: Kafka Streams' threads would otherwise keep it
        // alive after a failure, and the benchmark waiting for its end.
        try {
            switch (mode) {
                case "tables" -> tables(options);
                case "commands" -> commands(options);
                case "transaction-version" -> transactionVersion(options);
                default -> {
                    System.err.println("usage: peer.jar tables|commands brokers=... app=... (see Main's documentation)");
                    System.exit(2);
                }
            }
        } catch (NotCaughtUp e) {
            System.out.println("STOPPED " + e.getMessage());
            System.out.flush();
            System.exit(3);
        } catch (Exception e) {
            e.printStackTrace();
            System.exit(1);
        }
        System.exit(0);
    }

    /** How long a run may take to catch up (`deadline-minutes`, 30 by default). */
    private static long deadlineNanos;

    /** A run that did not catch up in time, or whose streams failed. */
    private static final class NotCaughtUp extends Exception {
        NotCaughtUp(String message) {
            super(message);
        }
    }

    private static void transactionVersion(Map<String, String> o) throws Exception {
        short level = Short.parseShort(o.get("version"));
        Properties config = new Properties();
        config.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, o.get("brokers"));
        try (Admin admin = Admin.create(config)) {
            FinalizedVersionRange finalized = admin.describeFeatures().featureMetadata().get()
                    .finalizedFeatures().get("transaction.version");
            short previous = finalized == null ? 0 : finalized.maxVersionLevel();
            if (level != previous) {
                FeatureUpdate.UpgradeType type = level < previous
                        ? FeatureUpdate.UpgradeType.SAFE_DOWNGRADE
                        : FeatureUpdate.UpgradeType.UPGRADE;
                admin.updateFeatures(Map.of("transaction.version", new FeatureUpdate(level, type)),
                        new UpdateFeaturesOptions()).all().get();
            }
            System.out.println("PREVIOUS " + previous);
        }
    }

    private static void commands(Map<String, String> o) throws Exception {
        Topology topology = EmailCommands.build(o.get("users"), o.get("commands"), o.get("secret"));
        Properties config = config(o.get("brokers"), o.get("app"));
        config.remove(StreamsConfig.NUM_STREAM_THREADS_CONFIG);
        if (o.containsKey("commit-interval-ms")) {
            config.put(StreamsConfig.COMMIT_INTERVAL_MS_CONFIG, Integer.parseInt(o.get("commit-interval-ms")));
        }
        if (o.containsKey("poll-ms")) {
            config.put(StreamsConfig.POLL_MS_CONFIG, Integer.parseInt(o.get("poll-ms")));
        }
        KafkaStreams streams = new KafkaStreams(topology, config);
        streams.start();
        while (streams.state() != KafkaStreams.State.RUNNING) {
            if (streams.state() == KafkaStreams.State.ERROR) {
                throw new IllegalStateException("the processor stopped");
            }
            Thread.sleep(50);
        }
        System.out.println("READY");
        System.out.flush();
        while (System.in.read() >= 0) {
            // Runs until the benchmark closes its end.
        }
        streams.close();
        streams.cleanUp();
    }

    private static void tables(Map<String, String> o) throws Exception {
        String brokers = o.get("brokers");
        if (o.containsKey("warm-users")) {
            KafkaStreams warm = runUntilCaughtUp(brokers, o.get("app") + "-warm", o.get("warm-users"),
                    o.get("warm-departments"));
            warm.close();
            warm.cleanUp();
        }
        Usage before = Usage.now();
        long started = System.nanoTime();
        Topology topology = DirectoryTables.build(o.get("users"), o.get("departments"));
        KafkaStreams streams = new KafkaStreams(topology, config(brokers, o.get("app")));
        streams.start();
        waitCaughtUp(streams, brokers, o.get("app"), topology);
        double seconds = (System.nanoTime() - started) / 1e9;
        Usage used = Usage.now().minus(before);
        System.out.printf("RESULT %.3f %.3f %.3f %.3f %.1f%n", seconds, used.cpu, used.jit, used.gc, peakRssMib());
        for (String table : new String[] {"user_contacts", "user_directory"}) {
            System.out.printf("ROWS %s %d%n", table, rows(streams, table).size());
        }
        for (Map.Entry<String, Object> e : rows(streams, "users_per_department").entrySet()) {
            DirectoryTables.Count c = (DirectoryTables.Count) e.getValue();
            if (c.users() > 0) {
                System.out.printf("COUNT %s %d %d%n", e.getKey().replace(' ', '_'), c.users(), c.activeUsers());
            }
        }
        if (Integer.parseInt(o.getOrDefault("updates", "0")) > 0) {
            // The benchmark publishes the updates once told, and says when they are there.
            System.out.println("LOADED");
            System.out.flush();
            new java.io.BufferedReader(new java.io.InputStreamReader(System.in)).readLine();
            Usage atLoad = Usage.now();
            long sent = System.nanoTime();
            waitCaughtUp(streams, brokers, o.get("app"), topology);
            System.out.printf("UPDATED %.3f %.3f%n", (System.nanoTime() - sent) / 1e9,
                    Usage.now().minus(atLoad).cpu);
        }
        System.out.flush();
        streams.close();
        streams.cleanUp();
    }

    private static KafkaStreams runUntilCaughtUp(String brokers, String app, String users, String departments)
            throws Exception {
        Topology topology = DirectoryTables.build(users, departments);
        KafkaStreams streams = new KafkaStreams(topology, config(brokers, app));
        streams.start();
        waitCaughtUp(streams, brokers, app, topology);
        return streams;
    }

    /** Waits until `streams` has processed everything its topics hold. */
    private static void waitCaughtUp(KafkaStreams streams, String brokers, String app, Topology topology)
            throws Exception {
        Properties adminConfig = new Properties();
        adminConfig.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, brokers);
        try (Admin admin = Admin.create(adminConfig)) {
            CaughtUp caughtUp = new CaughtUp(admin, app, topology);
            long deadline = System.nanoTime() + deadlineNanos;
            while (streams.state() != KafkaStreams.State.RUNNING || !caughtUp.check()) {
                if (streams.state() == KafkaStreams.State.ERROR) {
                    throw new NotCaughtUp("its streams failed");
                }
                if (System.nanoTime() > deadline) {
                    throw new NotCaughtUp("not caught up in " + deadlineNanos / 60_000_000_000L + " min");
                }
                Thread.sleep(100);
            }
        }
    }

    /** Kafka Streams' defaults, but for exactly-once v2 and two stream threads (miroir runs two workers). */
    private static Properties config(String brokers, String app) throws IOException {
        Properties p = new Properties();
        p.put(StreamsConfig.APPLICATION_ID_CONFIG, app);
        p.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, brokers);
        p.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, StreamsConfig.EXACTLY_ONCE_V2);
        p.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, 2);
        p.put(StreamsConfig.REPLICATION_FACTOR_CONFIG, 1);
        p.put(StreamsConfig.STATE_DIR_CONFIG, Files.createTempDirectory("peer-state").toString());
        return p;
    }

    private static Map<String, Object> rows(KafkaStreams streams, String table) {
        ReadOnlyKeyValueStore<String, Object> store =
                streams.store(StoreQueryParameters.fromNameAndType(table, QueryableStoreTypes.keyValueStore()));
        Map<String, Object> rows = new TreeMap<>();
        try (KeyValueIterator<String, Object> all = store.all()) {
            while (all.hasNext()) {
                KeyValue<String, Object> kv = all.next();
                rows.put(kv.key, kv.value);
            }
        }
        return rows;
    }

    private static double peakRssMib() throws IOException {
        for (String line : Files.readAllLines(Path.of("/proc/self/status"))) {
            if (line.startsWith("VmHWM:")) {
                return Long.parseLong(line.replaceAll("[^0-9]", "")) / 1024.0;
            }
        }
        return 0;
    }

    /** CPU, JIT compilation and garbage collection seconds of this process so far. */
    private record Usage(double cpu, double jit, double gc) {
        static Usage now() {
            var os = (com.sun.management.OperatingSystemMXBean) ManagementFactory.getOperatingSystemMXBean();
            long gcMs = 0;
            for (GarbageCollectorMXBean gc : ManagementFactory.getGarbageCollectorMXBeans()) {
                gcMs += Math.max(0, gc.getCollectionTime());
            }
            return new Usage(os.getProcessCpuTime() / 1e9,
                    ManagementFactory.getCompilationMXBean().getTotalCompilationTime() / 1e3, gcMs / 1e3);
        }

        Usage minus(Usage o) {
            return new Usage(cpu - o.cpu, jit - o.jit, gc - o.gc);
        }
    }
}
