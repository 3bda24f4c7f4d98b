package miroir.peer;

import org.apache.kafka.common.serialization.Serde;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.common.utils.Bytes;
import org.apache.kafka.streams.KeyValue;
import org.apache.kafka.streams.StreamsBuilder;
import org.apache.kafka.streams.Topology;
import org.apache.kafka.streams.kstream.Consumed;
import org.apache.kafka.streams.kstream.Grouped;
import org.apache.kafka.streams.kstream.KTable;
import org.apache.kafka.streams.kstream.Materialized;
import org.apache.kafka.streams.state.KeyValueStore;

/**
 * topologies/user-directory.toml's tables in the Kafka Streams DSL, each a RocksDB store:
 * `user_contacts` (filter and map), `user_directory` (a foreign-key left join with the
 * departments) and `users_per_department` (a foreign-key join grouped by the department's name,
 * counting users and active users; the benchmark runs miroir's query without `max(u.version)`,
 * which a KTable aggregation cannot keep under retractions without keeping every value).
 */
final class DirectoryTables {
    private DirectoryTables() {}

    /** A row of `user_contacts`. */
    record Contact(String id, String email, String name, String departmentId) {}

    /** A row of `user_directory`. */
    record Directory(String id, String name, String email, String department) {}

    /** A user as counted by `users_per_department`. */
    record Member(String department, boolean active) {}

    /** A row of `users_per_department`. */
    record Count(long users, long activeUsers) {
        Count add(Member m) {
            return new Count(users + 1, activeUsers + (m.active() ? 1 : 0));
        }

        Count subtract(Member m) {
            return new Count(users - 1, activeUsers - (m.active() ? 1 : 0));
        }
    }

    static final Serde<Contact> CONTACT = Codec.serde(
            (c, out) -> {
                Codec.writeText(out, c.id());
                Codec.writeText(out, c.email());
                Codec.writeText(out, c.name());
                Codec.writeText(out, c.departmentId());
            },
            in -> new Contact(Codec.readText(in), Codec.readText(in), Codec.readText(in), Codec.readText(in)));

    static final Serde<Directory> DIRECTORY = Codec.serde(
            (d, out) -> {
                Codec.writeText(out, d.id());
                Codec.writeText(out, d.name());
                Codec.writeText(out, d.email());
                Codec.writeText(out, d.department());
            },
            in -> new Directory(Codec.readText(in), Codec.readText(in), Codec.readText(in), Codec.readText(in)));

    static final Serde<Member> MEMBER = Codec.serde(
            (m, out) -> {
                Codec.writeText(out, m.department());
                out.writeBoolean(m.active());
            },
            in -> new Member(Codec.readText(in), in.readBoolean()));

    static final Serde<Count> COUNT = Codec.serde(
            (c, out) -> {
                out.writeLong(c.users());
                out.writeLong(c.activeUsers());
            },
            in -> new Count(in.readLong(), in.readLong()));

    /** The topology reading users from `userTopic` and departments from `departmentTopic`. */
    static Topology build(String userTopic, String departmentTopic) {
        StreamsBuilder builder = new StreamsBuilder();
        Consumed<String, String> json = Consumed.with(Serdes.String(), Serdes.String());
        KTable<String, User> users = builder.stream(userTopic, json)
                .groupByKey()
                .aggregate(User::new, (id, event, user) -> user.apply(event),
                        Materialized.<String, User, KeyValueStore<Bytes, byte[]>>as("users")
                                .withKeySerde(Serdes.String())
                                .withValueSerde(User.SERDE))
                .filter((id, user) -> user.present());
        KTable<String, Department> departments = builder.stream(departmentTopic, json)
                .groupByKey()
                .aggregate(Department::new, (id, event, department) -> department.apply(event),
                        Materialized.<String, Department, KeyValueStore<Bytes, byte[]>>as("departments")
                                .withKeySerde(Serdes.String())
                                .withValueSerde(Department.SERDE))
                .filter((id, department) -> department.id != null);

        users.filter((id, u) -> u.email != null && u.active)
                .mapValues(u -> new Contact(u.id, u.email.trim().toLowerCase(), u.name, u.departmentId),
                        Materialized.<String, Contact, KeyValueStore<Bytes, byte[]>>as("user_contacts")
                                .withKeySerde(Serdes.String())
                                .withValueSerde(CONTACT));

        users.leftJoin(departments, u -> u.departmentId,
                (u, d) -> new Directory(u.id, u.name, u.email, d == null ? "unassigned" : d.name),
                Materialized.<String, Directory, KeyValueStore<Bytes, byte[]>>as("user_directory")
                        .withKeySerde(Serdes.String())
                        .withValueSerde(DIRECTORY));

        users.join(departments, u -> u.departmentId, (u, d) -> new Member(d.name, u.active),
                        Materialized.<String, Member, KeyValueStore<Bytes, byte[]>>as("department_members")
                                .withKeySerde(Serdes.String())
                                .withValueSerde(MEMBER))
                .groupBy((id, m) -> KeyValue.pair(m.department(), m), Grouped.with(Serdes.String(), MEMBER))
                .aggregate(() -> new Count(0, 0),
                        (department, m, count) -> count.add(m),
                        (department, m, count) -> count.subtract(m),
                        Materialized.<String, Count, KeyValueStore<Bytes, byte[]>>as("users_per_department")
                                .withKeySerde(Serdes.String())
                                .withValueSerde(COUNT));
        return builder.build();
    }
}
