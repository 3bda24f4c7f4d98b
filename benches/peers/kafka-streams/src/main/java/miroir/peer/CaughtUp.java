package miroir.peer;

import java.util.HashMap;
import java.util.HashSet;
import java.util.Map;
import java.util.Set;
import java.util.concurrent.ExecutionException;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.ListOffsetsOptions;
import org.apache.kafka.clients.admin.OffsetSpec;
import org.apache.kafka.clients.admin.TopicDescription;
import org.apache.kafka.clients.consumer.OffsetAndMetadata;
import org.apache.kafka.common.IsolationLevel;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.TopologyDescription;

/**
 * Whether an application has processed everything: every partition it reads (its sources and
 * its repartition and foreign-key subscription topics) has a committed offset at the partition's
 * last stable offset, twice in a row.
 */
final class CaughtUp {
    private final Admin admin;
    private final String applicationId;
    private final Set<String> topics;
    private int inARow;
    private int checks;

    /** Checks `applicationId`'s progress on the topics `topology` reads from. */
    CaughtUp(Admin admin, String applicationId, Topology topology) {
        this.admin = admin;
        this.applicationId = applicationId;
        this.topics = new HashSet<>();
        Set<String> internal = new HashSet<>();
        for (TopologyDescription.Subtopology s : topology.describe().subtopologies()) {
            for (TopologyDescription.Node node : s.nodes()) {
                if (node instanceof TopologyDescription.Source source) {
                    internal.addAll(source.topicSet());
                }
            }
        }
        // Repartition and subscription topics are named after the application.
        for (String topic : internal) {
            boolean repartition = topic.endsWith("-repartition") || topic.endsWith("-topic");
            topics.add(repartition ? applicationId + "-" + topic : topic);
        }
    }

    /** Checks once; true on the second check in a row that finds nothing left. */
    boolean check() throws ExecutionException, InterruptedException {
        inARow = drained() ? inARow + 1 : 0;
        return inARow >= 2;
    }

    private boolean drained() throws ExecutionException, InterruptedException {
        Map<TopicPartition, OffsetSpec> ends = new HashMap<>();
        for (TopicDescription d : admin.describeTopics(topics).allTopicNames().get().values()) {
            d.partitions().forEach(p -> ends.put(new TopicPartition(d.name(), p.partition()), OffsetSpec.latest()));
        }
        Map<TopicPartition, OffsetAndMetadata> committed =
                admin.listConsumerGroupOffsets(applicationId).partitionsToOffsetAndMetadata().get();
        var offsets = admin.listOffsets(ends, new ListOffsetsOptions(IsolationLevel.READ_COMMITTED)).all().get();
        int behind = 0;
        long left = 0;
        for (var e : offsets.entrySet()) {
            OffsetAndMetadata c = committed.get(e.getKey());
            long at = c == null ? 0 : c.offset();
            if (at < e.getValue().offset()) {
                behind++;
                left += e.getValue().offset() - at;
            }
        }
        if (behind > 0 && ++checks % 100 == 0) {
            System.err.printf("peer: %s: %d partitions behind, %d records to go%n", applicationId, behind, left);
        }
        return behind == 0;
    }
}
