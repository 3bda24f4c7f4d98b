package miroir.peer;

import com.fasterxml.jackson.annotation.JsonIgnoreProperties;
import com.fasterxml.jackson.annotation.JsonProperty;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.IOException;

/** A User entity event as the master publishes it (a full snapshot, JSON). */
@JsonIgnoreProperties(ignoreUnknown = true)
final class UserEvent {
    private static final ObjectMapper JSON = new ObjectMapper();

    public String id;
    public String email;
    public String name;
    @JsonProperty("department_id")
    public String departmentId;
    public Boolean active;
    public Long version;
    @JsonProperty("event_type")
    public String eventType;
    @JsonProperty("updated_at")
    public String updatedAt;
    @JsonProperty("changed_by")
    public String changedBy;

    /** The event in `json`, or null when it is malformed or has no id or version. */
    static UserEvent parse(String json) {
        if (json == null) {
            return null;
        }
        try {
            UserEvent event = JSON.readValue(json, UserEvent.class);
            return event.id == null || event.version == null ? null : event;
        } catch (IOException e) {
            return null;
        }
    }

    String toJson() {
        try {
            return JSON.writeValueAsString(this);
        } catch (IOException e) {
            throw new IllegalStateException(e);
        }
    }
}
