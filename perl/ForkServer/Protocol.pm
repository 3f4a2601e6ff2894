package ForkServer::Protocol;
use strict;
use warnings;

use Exporter 'import';

# The vocabulary, every name and byte value, is declared once for both
# sides in protocol.json next to this module, which psgi_forkserver/
# protocol.py reads too. Each of its groups (packet, modifier1, mask,
# vassal_bytes, emperor_bytes) becomes constants here and an export tag of
# the same name. Read while this module compiles, so that the codec below
# and every importer get them as compile-time constants.
our $PROTOCOL_FILE;
our %EXPORT_TAGS;
BEGIN {
    require File::Basename;
    require File::Spec;
    require constant;
    $PROTOCOL_FILE = File::Spec->catfile(File::Basename::dirname(__FILE__), 'protocol.json');
    open my $fh, '<:raw', $PROTOCOL_FILE or die "cannot read $PROTOCOL_FILE: $!\n";
    # JSON::XS when installed: it loads in a third of JSON::PP's time, which
    # every process that loads this module pays (prove's and the base's
    # start in `emperor prove`, every base and vassal)
    my $json = eval { require JSON::XS; JSON::XS->new } || do { require JSON::PP; JSON::PP->new };
    my $decl = $json->decode(do { local $/; <$fh> });
    for my $group (grep { ref $decl->{$_} eq 'HASH' } keys %$decl) {
        my $names = $decl->{$group};
        for my $name (keys %$names) {
            die "$PROTOCOL_FILE: $group.$name: not a constant name\n" unless $name =~ /\A[A-Z][A-Z0-9_]*\z/;
            die "$PROTOCOL_FILE: $group.$name: not a non-negative integer\n"
                unless defined $names->{$name} && $names->{$name} =~ /\A\d+\z/;
        }
        constant->import({ map { $_ => 0 + $names->{$_} } keys %$names });
        $EXPORT_TAGS{$group} = [ sort keys %$names ];
    }
}

$EXPORT_TAGS{codec} = [qw(
    encode_packet decode_header decode_packet read_packet
    encode_array decode_array encode_dict decode_dict
)];
our @EXPORT_OK = map { @$_ } values %EXPORT_TAGS;
$EXPORT_TAGS{all} = [@EXPORT_OK];

# Strings on the wire are bytes. A character string that cannot be
# downgraded would silently be encoded as UTF-8 by pack; refuse it instead.
sub _bytes {
    my ($what, $s) = @_;
    die "$what is undefined\n" unless defined $s;
    utf8::downgrade($s, 1) or die "$what contains wide characters (encode it first)\n";
    return $s;
}

sub encode_packet {
    my ($mod1, $mod2, $body) = @_;
    $body = _bytes('packet body', $body // '');
    die "packet body too long: " . length($body) . " bytes (max " . MAX_BODY . ")\n"
        if length $body > MAX_BODY;
    for ($mod1, $mod2) {
        die "modifier out of range: $_\n" unless defined && /\A\d+\z/ && $_ <= 255;
    }
    return pack('C v C', $mod1, length $body, $mod2) . $body;
}

# Returns (modifier1, body size, modifier2) of a 4-byte header.
sub decode_header {
    my ($bytes) = @_;
    die "packet header needs " . HEADER_SIZE . " bytes, got " . length($bytes) . "\n"
        unless length $bytes == HEADER_SIZE;
    return unpack('C v C', $bytes);
}

# Decodes one whole packet: the string must be exactly header + body.
sub decode_packet {
    my ($bytes) = @_;
    die "packet truncated: " . length($bytes) . " bytes, the header alone needs " . HEADER_SIZE . "\n"
        if length $bytes < HEADER_SIZE;
    my ($mod1, $size, $mod2) = decode_header(substr($bytes, 0, HEADER_SIZE));
    my $have = length($bytes) - HEADER_SIZE;
    die "packet truncated: header announces $size body bytes, got $have\n" if $have < $size;
    die "packet has " . ($have - $size) . " bytes of trailing garbage after its $size-byte body\n"
        if $have > $size;
    return ($mod1, $mod2, substr($bytes, HEADER_SIZE));
}

# Reads one packet from a blocking handle. Dies on end of file or error.
sub read_packet {
    my ($fh) = @_;
    my $head = _read_exactly($fh, HEADER_SIZE, 'packet header');
    my ($mod1, $size, $mod2) = decode_header($head);
    my $body = _read_exactly($fh, $size, 'packet body');
    return ($mod1, $mod2, $body);
}

sub _read_exactly {
    my ($fh, $want, $what) = @_;
    my $buf = '';
    while (length $buf < $want) {
        my $n = sysread($fh, $buf, $want - length $buf, length $buf);
        die "reading $what: $!\n" unless defined $n;
        die "reading $what: end of file after " . length($buf) . " of $want bytes\n" if $n == 0;
    }
    return $buf;
}

sub _encode_item {
    my ($what, $s) = @_;
    $s = _bytes($what, $s);
    die "$what too long: " . length($s) . " bytes (max 65535)\n" if length $s > 65535;
    return pack('v', length $s) . $s;
}

sub encode_array {
    my @items = @_;
    return join '', map { _encode_item("array item $_", $items[$_]) } 0 .. $#items;
}

sub encode_dict {
    my @pairs = @_;
    die "encode_dict needs key/value pairs\n" if @pairs % 2;
    my $out = '';
    for (my $i = 0; $i < @pairs; $i += 2) {
        $out .= _encode_item("dict key $i", $pairs[$i]) . _encode_item("dict value of '$pairs[$i]'", $pairs[$i + 1]);
    }
    return $out;
}

# Splits a body into its u16-length-prefixed items. A length that runs past
# the end of the body is an error, never a short item.
sub _decode_items {
    my ($what, $body) = @_;
    my @items;
    my $pos = 0;
    my $end = length $body;
    while ($pos < $end) {
        die "$what item " . scalar(@items) . ": length field truncated at offset $pos of $end\n"
            if $end - $pos < 2;
        my $len = unpack('v', substr($body, $pos, 2));
        $pos += 2;
        die "$what item " . scalar(@items) . ": length $len at offset " . ($pos - 2)
            . " runs past the end of the $end-byte body\n"
            if $len > $end - $pos;
        push @items, substr($body, $pos, $len);
        $pos += $len;
    }
    return @items;
}

sub decode_array {
    my ($body) = @_;
    return _decode_items('array', $body);
}

# Returns the pairs in wire order (a list, so a caller can detect repeats).
sub decode_dict {
    my ($body) = @_;
    my @items = _decode_items('dict', $body);
    die "dict: key '$items[-1]' has no value\n" if @items % 2;
    return @items;
}

1;

__END__

=head1 NAME

ForkServer::Protocol - uwsgi packets, arrays and dicts as spoken by the uWSGI Emperor and fork server

=head1 SYNOPSIS

  use ForkServer::Protocol qw(:codec :modifier1 :mask);

  my $bytes = encode_packet(MODIFIER1_FORK_SERVER, MASK_PIPE, encode_array($0, '--ini', 'app1.ini'));
  my ($mod1, $mod2, $body) = decode_packet($bytes);
  my @argv = decode_array($body);

=head1 DESCRIPTION

A packet is C<modifier1 (u8), body size (u16 LE), modifier2 (u8), body>.
An array body is a sequence of C<u16 LE length, bytes>; a dict body is a
sequence of such items taken as key/value pairs.

Every decoder dies with a one-line message (ending in a newline) on
malformed input: a length that runs past the end of the body, a truncated
length field, a packet shorter or longer than its header announces, a dict
key without a value. Encoders die on strings longer than 65535 bytes and on
strings with wide characters.

=head1 CONSTANTS

The names of the protocol, read from F<protocol.json> next to this module
as it loads (F<psgi_forkserver/protocol.py> reads the same file; a file
that cannot be read or parsed, or a value that is not a non-negative
integer, stops the load with the reason). Each group of the file is an
export tag; exported on request, by name or by tag:

=over

=item C<:packet> HEADER_SIZE, MAX_BODY

=item C<:modifier1> MODIFIER1_FORK_SERVER (35), MODIFIER1_CONFIG (115)

=item C<:mask> MASK_PIPE, MASK_CONFIG, MASK_ON_DEMAND, MASK_CGROUP: modifier2 of an adoption request

=item C<:vassal_bytes> SPAWNED, CONFIG_AGAIN, ACCEPTING, LOYAL, DONE, HEARTBEAT: what a vassal writes on its Emperor pipe

=item C<:emperor_bytes> STOP_NOW, RELOAD, STOP (graceful): what the Emperor writes

=back

C<:codec> is the functions below; C<:all> is everything.

=head1 FUNCTIONS

=over

=item encode_packet($modifier1, $modifier2, $body)

=item decode_header($four_bytes) -> ($modifier1, $size, $modifier2)

=item decode_packet($bytes) -> ($modifier1, $modifier2, $body)

=item read_packet($fh) -> ($modifier1, $modifier2, $body)

Blocking read of one packet; dies on end of file.

=item encode_array(@items), decode_array($body) -> @items

=item encode_dict(%pairs_in_order), decode_dict($body) -> @pairs

=back

=cut
